"""Full-size Stable Diffusion 1.x architecture with random weights, built from configs (no hub).

UNet2DConditionModel's default config *is* SD 1.x's (860 M parameters, 16 cross-attention layers);
the VAE and the CLIP ViT-L/14 text encoder get SD 1.x's sizes. The tokenizer is cdiff's tiny BPE one
(the text encoder keeps CLIP's 49,408-row embedding table, so token-embedding costs are real).
"""

from __future__ import annotations

import random

import torch
from PIL import Image, ImageDraw


def sd15_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(cross_attention_dim=768)


def sd15_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
    )


def sd15_text_config(**ids):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=768, **ids)


def build_sd15(seed: int = 0):
    import tempfile

    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from cdiff_cli.testing.tiny import write_tiny_tokenizer

    torch.manual_seed(seed)
    tok = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(tempfile.mkdtemp())), model_max_length=77)
    te = CLIPTextModel(sd15_text_config(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    unet = sd15_unet()
    vae = sd15_vae()
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def write_images(folder, n: int, seed: int, size: int = 320) -> list:
    """n photo-like test images (coloured shapes on gradients), non-square."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        im = Image.new("RGB", (size + 64, size), tuple(rng.randrange(256) for _ in range(3)))
        d = ImageDraw.Draw(im)
        for _ in range(4):
            x, y = rng.randrange(size), rng.randrange(size)
            d.ellipse((x, y, x + 80, y + 60), fill=tuple(rng.randrange(256) for _ in range(3)))
        p = folder / f"{i}.png"
        im.save(p)
        paths.append(p)
    return paths


class PeakMemory:
    """Peak memory of a block: GPU memory allocated, or process RSS sampled every 20 ms on CPU.

    (ru_maxrss would also count the load of the base model, which is the same for both trainers.)
    """

    def __init__(self, device: torch.device):
        self.device, self.peak_mb, self.start_mb = device, 0.0, 0.0
        self.reserved_mb = None  # CUDA: the most the caching allocator held (what the GPU must have)

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def __enter__(self):
        import threading

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        self.start_mb = self.peak_mb = self.rss_mb()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.02):
                self.peak_mb = max(self.peak_mb, self.rss_mb())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.reserved_mb = torch.cuda.max_memory_reserved(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self.rss_mb())


class PhasePeaks:
    """Peak memory of each phase of a whole run (loading, caching, training...): process RSS sampled
    every 10 ms on CPU (with ru_maxrss, the kernel's own whole-process peak, as the total), or GPU
    memory allocated per phase on CUDA. `phase(name)` ends the current phase and starts another."""

    def __init__(self, device: torch.device):
        import threading

        self.device, self.peaks, self.seconds = device, {}, {}
        self.name, self._t0 = "start", __import__("time").perf_counter()
        self.peaks[self.name] = PeakMemory.rss_mb() if device.type != "cuda" else 0.0
        self._lock, self._stop = threading.Lock(), threading.Event()
        if device.type != "cuda":
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self):
        while not self._stop.wait(0.01):
            rss = PeakMemory.rss_mb()
            with self._lock:
                self.peaks[self.name] = max(self.peaks.get(self.name, 0.0), rss)

    def _close(self):
        import time

        now = time.perf_counter()
        self.seconds[self.name] = self.seconds.get(self.name, 0.0) + now - self._t0
        self._t0 = now
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peaks[self.name] = max(self.peaks.get(self.name, 0.0), torch.cuda.max_memory_allocated(self.device) / 2**20)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with self._lock:
                self.peaks[self.name] = max(self.peaks.get(self.name, 0.0), PeakMemory.rss_mb())

    def phase(self, name: str) -> None:
        self._close()
        with self._lock:
            self.name = name

    def finish(self) -> dict:
        """{"phases": {name: peak MiB}, "seconds": {name: s}, "peak_mb": the whole run's peak}."""
        import resource

        self._close()
        self._stop.set()
        whole = max(self.peaks.values())
        if self.device.type != "cuda":
            whole = max(whole, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return {"phases": {k: round(v, 1) for k, v in self.peaks.items()},
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()}, "peak_mb": round(whole, 1)}
