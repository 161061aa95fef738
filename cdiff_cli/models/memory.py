"""A preflight estimate of training memory, so an out-of-memory is predicted before minutes of work.

The estimate is deliberately simple and errs a little high: weights at their storage precision, fp32
trainable weights with their gradients and AdamW state, UNet activations proportional to the number
of latent pixels in one forward/backward, and what the device adds on top. The activation constants
come from tracing cdiff's own step on the full SD 1.x UNet (`benchmarks/trace_memory.py`: every
tensor the step creates, counted on fake tensors, up to 512 px and batch 8); the CPU overhead from
the process RSS that `benchmarks/bench_train.py` measures against that trace. The test suite holds
the estimate to the trace.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# Bytes of activations per latent pixel per image (saved for the backward, and the backward's
# temporaries), full SD 1.x UNet, fp32, with cdiff's frozen layers (traced: 288e3 at 256 px).
ACT_BYTES_PER_LATENT_PIXEL_FP32 = 300e3
HALF_ACTIVATION_FACTOR = 0.55  # autocast keeps some tensors in fp32 (traced: 0.55 at 256 px, 0.49 at 512)
CHECKPOINT_FACTOR = 0.35
CUDA_CONTEXT_BYTES = 600e6
CUDA_FRAGMENTATION = 0.2  # the caching allocator reserves more than the live tensors: rounding, fragments
# On a CPU the Python/PyTorch runtime, and glibc keeping freed activation memory about as large as
# the activations themselves (bench_train.py: RSS 5.12 GiB fp32 / 2.96 GiB bf16 against 5.21 / 2.97 here).
CPU_RUNTIME_BYTES = 350e6
CPU_ALLOCATOR_RETENTION = 1.0
# Training cuts each token-embedding table down to the rows its prompts use (`textcond.keep_rows_for`):
# a few hundred of CLIP's 49,408; counted generously.
TOKEN_ROWS_KEPT = 1024


@dataclass
class Estimate:
    weights: float
    trainable: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.trainable + self.activations + self.overhead

    def describe(self) -> str:
        gb = 1e9
        return (f"{self.total / gb:.1f} GB (weights {self.weights / gb:.1f}, trainable+optimizer {self.trainable / gb:.2f}, "
                f"activations {self.activations / gb:.1f})")


def estimate_training_memory(
    *,
    frozen_params: int,
    frozen_bytes_per_param: int,
    trainable_params: int,
    images_per_pass: int,
    resolution: int,
    vae_factor: int = 8,
    unet_params: int = 860_000_000,
    half: bool = False,
    gradient_checkpointing: bool = False,
    cuda: bool = False,
) -> Estimate:
    """Pure arithmetic; activations scale with the UNet's size relative to SD 1.x's."""
    latent_pixels = (resolution // vae_factor) ** 2
    act = ACT_BYTES_PER_LATENT_PIXEL_FP32 * latent_pixels * images_per_pass * (unet_params / 860e6)
    if half:
        act *= HALF_ACTIVATION_FACTOR
    if gradient_checkpointing:
        act *= CHECKPOINT_FACTOR
    trainable = trainable_params * 4 * 4  # fp32 weight, gradient, two AdamW moments
    if cuda:
        overhead = CUDA_CONTEXT_BYTES + CUDA_FRAGMENTATION * act
    else:
        overhead = CPU_RUNTIME_BYTES + CPU_ALLOCATOR_RETENTION * act
    return Estimate(frozen_params * frozen_bytes_per_param, trainable, act, overhead)


def available_memory(device: torch.device) -> float | None:
    """Memory the run can have in all, to compare with the estimate, which counts the loaded base too.

    Called with the base already loaded, so what is free no longer includes it: on a GPU, free memory
    plus what PyTorch holds (`memory_reserved`: the base's weights) plus the CUDA context (created, and
    counted by the estimate); on Linux, MemAvailable plus this process's anonymous memory (the runtime,
    and weights converted to another precision; weights mapped from their file count as available)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return float(free) + float(torch.cuda.memory_reserved(device)) + CUDA_CONTEXT_BYTES
    try:
        available = held = None
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = float(line.split()[1]) * 1024
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                held = float(line.split()[1]) * 1024
    except OSError:
        return None
    return None if available is None else available + (held or 0.0)


def text_params_in_training(text_encoder, offload: bool = False) -> int:
    """A text encoder's parameters on the device while training: its token table cut down to the rows
    the prompts use (`textcond.keep_rows_for`), and under `offload` only the parts outside its encoder
    layers plus one layer (`offload.resident_params`)."""
    from cdiff_cli.models.offload import resident_params

    vocab, width = text_encoder.get_input_embeddings().weight.shape
    total = resident_params(text_encoder, trainable=set()) if offload else sum(p.numel() for p in text_encoder.parameters())
    return total - (vocab - min(vocab, TOKEN_ROWS_KEPT)) * width


def estimate_for_pipe(pipe, cfg, device: torch.device | None = None) -> Estimate:
    """The estimate for training `pipe` with `cfg` on `device` (by default where its UNet is). Under
    `cfg.offload` only the UNet and text-encoder weights that stay on the device count
    (`offload.resident_params`), and checkpointing is on."""
    from cdiff_cli.core.layers import trainable_names
    from cdiff_cli.core.textcond import encoders
    from cdiff_cli.models.offload import resident_params

    unet = pipe.unet
    names = set(trainable_names(unet, cfg.mode))
    trainable_params = sum(p.numel() for n, p in unet.named_parameters() if n in names)
    te_params = sum(text_params_in_training(te, cfg.offload) for _, te in encoders(pipe))
    unet_params = sum(p.numel() for p in unet.parameters())
    unet_params_on_device = resident_params(unet, trainable=names) if cfg.offload else unet_params
    frozen = unet_params_on_device + te_params - trainable_params
    dtype = unet.conv_in.weight.dtype
    images = cfg.micro_batch or cfg.batch_size
    return estimate_training_memory(
        frozen_params=frozen,
        frozen_bytes_per_param=torch.finfo(dtype).bits // 8,
        trainable_params=trainable_params,
        images_per_pass=images,
        resolution=cfg.resolution,
        vae_factor=int(pipe.vae_scale_factor),
        unet_params=unet_params,
        half=cfg.precision in ("bf16", "fp16"),
        gradient_checkpointing=cfg.gradient_checkpointing or cfg.offload,
        cuda=(device or unet.device).type == "cuda",
    )


def preflight_warning(estimate: Estimate, available: float | None, low_memory: bool, offload: bool = False,
                      gpu: bool = False) -> str | None:
    """A warning when the estimate exceeds 90 % of the memory available, with what to change."""
    if available is None or estimate.total <= 0.9 * available:
        return None
    if not low_memory:
        hint = "use --low-memory (or lower --batch-size)"
    elif gpu and not offload:
        hint = "add --offload (frozen weights in CPU memory), or lower --batch-size or --resolution"
    else:
        hint = "lower --batch-size or --resolution"
    return (f"this run needs about {estimate.describe()}, but only {available / 1e9:.1f} GB are available: "
            f"it will probably run out of memory; {hint}")
