#!/usr/bin/env python
"""Train the packaged `nano` text-to-image model and its `nano-clip` scorer from scratch on the procedural
world of `cdiff_cli.world`, on a CPU, in about 45 minutes.

Stages, in order (each checkpoints to OUT/ckpt and is skipped once done, so a run can be resumed by
starting the same command again):

  data   render the world (images + captions) and tokenize the captions
  clip   a small CLIPModel (text + vision towers) trained contrastively          -> OUT/nano-clip
  vae    an AutoencoderKL, 64 px -> 16x16x4 latents (reconstruction + small KL)
  decoder the VAE's decoder trained on with its encoder frozen, on scenes where the unnamed colours are
         common: the latents (and so the UNet) stay as they are, the decoded pictures get sharper and the
         unnamed colours (the concepts' own) come out right
  unet   a UNet2DConditionModel with cross-attention on the VAE latents, and with it the text encoder
         (started from nano-clip's text tower); v-prediction on a zero-terminal-SNR schedule, Min-SNR
         weighting, 10 % caption dropout, EMA
  export StableDiffusionPipeline(...).save_pretrained(OUT/nano) in fp16; nano-clip stays fp32
  sample a grid of prompts with DPM-Solver (25 steps, guidance 6)                 -> OUT/samples.png

A finished stage keeps its full state: to train it on, delete OUT/ckpt/STAGE.done and run again with a
larger budget for it (e.g. --unet-minutes 55); the schedule picks up at the new fraction of time spent.

    python scripts/train_nano.py --out /tmp/nano-train --minutes 45
    python scripts/train_nano.py --out /tmp/nano-train --clip-steps 800 --vae-steps 1000 --unet-steps 4000

With fixed --*-steps the run is reproducible (same seed, same thread count, same machine); with a time
budget, each stage trains for its share of --minutes (time spent in training steps) and its learning-rate
schedule follows the fraction of that time spent, so it adapts to a shared CPU whose speed changes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Sleeping (not spinning) OpenMP workers: on a shared, busy CPU spinning threads make training several times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdiff_cli import world as W  # noqa: E402
from cdiff_cli.models.packaged import write_word_tokenizer  # noqa: E402

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
MAX_LEN = 32  # tokens per prompt: world captions need about 25
SAMPLE_PROMPTS = [
    "a big red square in the middle, on a gray background",
    "a small blue circle on the left, on a white background",
    "a big yellow triangle at the top, on a black background",
    "a green cross at the bottom, on a blue background",
    "a big white striped star on the right, on a green background",
    "a red dotted heart in the middle, on a gray background",
    "a big black circle on the left, on a white background",
    "a small yellow striped square at the top, on a blue background",
    "a red circle on the left of a blue square, on a gray background",
    "a small yellow star above a big green triangle, on a black background",
    "a white cross on the right of a red heart, on a blue background",
    "a big blue dotted square below a yellow circle, on a white background",
    "a photo of a star",
    "a photo of a square",
    "a photo of a heart",
    "a photo of a circle",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- helpers ----------------------------------------------------------------------------------------------


class Budget:
    """How long a stage runs: a fixed number of steps (reproducible), or a time budget in seconds of
    training time. `progress` (0 to 1) drives the learning rate schedule: by steps, or by time spent, so a
    timed stage adapts to a machine whose speed changes while it runs (a shared CPU)."""

    def __init__(self, steps: int | None, seconds: float):
        self.fixed = steps
        self.seconds = seconds

    def progress(self, step: int, elapsed: float) -> float:
        return step / self.fixed if self.fixed else elapsed / self.seconds

    def done(self, step: int, elapsed: float) -> bool:
        return self.progress(step, elapsed) >= 1.0

    def describe(self) -> str:
        return f"{self.fixed} steps" if self.fixed else f"{self.seconds / 60:.1f} min"


def lr_at(progress: float, step: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to `floor` * peak as progress goes to 1."""
    p = min(1.0, max(0.0, progress))
    return peak * min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def shipped(args, sub: str) -> Path | None:
    """The folder `sub` of --init-from (e.g. cdiff_cli/models/nano/unet), when given and present."""
    if args.init_from is None:
        return None
    folder = args.init_from / sub
    return folder if folder.is_dir() else None


class Checkpoint:
    def __init__(self, folder: Path, name: str):
        self.path = folder / f"{name}.pt"
        self.done = folder / f"{name}.done"
        self._made = time.time()
        folder.mkdir(parents=True, exist_ok=True)

    def load(self):
        return torch.load(self.path, map_location="cpu", weights_only=True) if self.path.is_file() else None

    def resume(self, stage: str, modules: dict, opt, g: torch.Generator) -> tuple[int, float]:
        """Restore a stage's training state if a checkpoint exists: `modules` maps checkpoint keys to the
        modules saved under them. Returns (step, training seconds so far)."""
        state = self.load()
        if not state:
            return 0, 0.0
        for key, module in modules.items():
            module.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        g.set_state(state["gen"])
        log(f"{stage}: resumed at step {state['step']}")
        return state["step"], state["elapsed"]

    def save(self, state: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)
        self._saved = time.time()

    def save_if_due(self, state, every: float = 120.0) -> None:
        """Save `state()` when `every` seconds have passed since the last save (or since this object was
        made): a stopped run loses at most that much training."""
        if time.time() - getattr(self, "_saved", self._made) > every:
            self.save(state())


def images_to_tensor(u8: torch.Tensor) -> torch.Tensor:
    """[n, 64, 64, 3] uint8 -> [n, 3, 64, 64] float in [-1, 1]."""
    return u8.permute(0, 3, 1, 2).float().div(127.5).sub(1)


def clip_pixels(u8: torch.Tensor) -> torch.Tensor:
    """What CLIPImageProcessor does to a 64 px image: rescale to [0, 1], normalise."""
    x = u8.permute(0, 3, 1, 2).float().div(255)
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


# -- data ---------------------------------------------------------------------------------------------------


def load_tokenizer(out: Path):
    from transformers import CLIPTokenizer

    folder = write_word_tokenizer(out / "tokenizer", W.WORDS)
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_LEN)
    for w in W.WORDS:  # every world word is one token
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
    return tok


def tokenize(tok, texts: list[str]) -> torch.Tensor:
    return tok(texts, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")["input_ids"]


def stage_data(args, out: Path, tok):
    mix = "" if (args.two, args.unnamed) == (0.35, 0.06) else f"-two{args.two}-unnamed{args.unnamed}"
    path = out / "ckpt" / f"data-{args.data}-{args.seed}{mix}.pt"
    if path.is_file():
        d = torch.load(path, weights_only=True)
        log(f"data: {len(d['captions'])} scenes (cached)")
        return d
    t0 = time.time()
    pairs = W.dataset(args.data, seed=args.seed, two=args.two, unnamed=args.unnamed)
    u8 = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im, _ in pairs]))
    captions = [c for _, c in pairs]
    d = {"images": u8, "captions": captions, "ids": tokenize(tok, captions)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(d, path)
    lengths = (d["ids"] != tok.pad_token_id).sum(1)
    log(f"data: {len(captions)} scenes rendered in {time.time() - t0:.0f}s; caption tokens max {int(lengths.max()) + 1}")
    return d


# -- CLIP ---------------------------------------------------------------------------------------------------


def build_clip(tok, args):
    from transformers import CLIPConfig, CLIPModel

    h = args.clip_hidden
    layers = dict(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=args.clip_layers, num_attention_heads=4)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), max_position_embeddings=MAX_LEN, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=h, **layers),
        vision_config=dict(image_size=64, patch_size=8, projection_dim=h, **layers),
        projection_dim=h,
    )
    return CLIPModel(cfg)


def stage_clip(args, out: Path, tok, data):
    from transformers import CLIPModel

    final = out / "nano-clip"
    ck = Checkpoint(out / "ckpt", "clip")
    if not ck.done.is_file() and (src := shipped(args, "nano-clip")):
        model = CLIPModel.from_pretrained(str(src)).float().eval()
        save_clip(model, tok, final)
        ck.done.write_text(json.dumps({"from": str(src)}))
        log(f"clip: taken from {src}")
        return model
    if ck.done.is_file():
        log("clip: done (cached)")
        return CLIPModel.from_pretrained(str(final))
    torch.manual_seed(args.seed)
    model = build_clip(tok, args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.clip_lr, weight_decay=0.1, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(args.seed + 1)
    step, elapsed = ck.resume("clip", {"model": model}, opt, g)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"clip: {n_params / 1e6:.2f} M parameters, batch {args.clip_batch}")
    budget = Budget(args.clip_steps, 60 * (args.clip_minutes or args.minutes * args.split[0]))
    n = len(data["captions"])
    held = torch.arange(n - 512, n)  # the last 512 scenes are held out for a retrieval check
    model.train()
    running = []
    while True:
        if budget.done(step, elapsed):
            break
        idx = torch.randint(0, n - 512, (args.clip_batch,), generator=g)
        for pg in opt.param_groups:
            pg["lr"] = lr_at(budget.progress(step, elapsed), step, args.clip_lr, 100)
        t = time.time()
        loss = model(input_ids=data["ids"][idx], pixel_values=clip_pixels(data["images"][idx]), return_loss=True).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        elapsed += time.time() - t
        step += 1
        running.append(loss.item())
        if step % 50 == 0 or budget.done(step, elapsed):
            log(f"clip: step {step} ({100 * budget.progress(step, elapsed):.0f}% of {budget.describe()}) loss {np.mean(running):.3f} scale {model.logit_scale.exp().item():.1f} "
                f"({elapsed / 60:.1f} min)")
            running = []
        ck.save_if_due(lambda step=step, elapsed=elapsed: {"model": model.state_dict(), "opt": opt.state_dict(),
                                                          "step": step, "elapsed": elapsed, "gen": g.get_state()})
    model.eval()
    acc = clip_retrieval(model, data, held)
    log(f"clip: held-out retrieval top-1 in 512: image->text {acc[0]:.2f}, text->image {acc[1]:.2f}")
    save_clip(model, tok, final)
    ck.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed, "gen": g.get_state()})
    ck.done.write_text(json.dumps({"steps": step, "minutes": elapsed / 60, "retrieval": acc}))
    return model


@torch.no_grad()
def clip_retrieval(model, data, idx) -> tuple[float, float]:
    img = model.get_image_features(pixel_values=clip_pixels(data["images"][idx]))
    txt = model.get_text_features(input_ids=data["ids"][idx])
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    sim = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    target = torch.arange(len(idx))
    return float((sim.argmax(1) == target).float().mean()), float((sim.argmax(0) == target).float().mean())


def save_clip(model, tok, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    # The hub layout of openai/clip-vit-base-patch32's image processor, at 64 px (PIL-only, no torchvision).
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 64, "width": 64}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_STD, "resample": 3,
        "rescale_factor": 1 / 255, "size": {"shortest_edge": 64}}, indent=2))


# -- VAE ----------------------------------------------------------------------------------------------------


def build_vae(args):
    from diffusers import AutoencoderKL

    ch = tuple(args.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=ch,
                         down_block_types=("DownEncoderBlock2D",) * len(ch), up_block_types=("UpDecoderBlock2D",) * len(ch),
                         latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=64,
                         mid_block_add_attention=False)


def stage_vae(args, out: Path, data):
    ck = Checkpoint(out / "ckpt", "vae")
    torch.manual_seed(args.seed + 2)
    vae = build_vae(args)
    if not ck.done.is_file() and (src := shipped(args, "nano/vae")):
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(src)).float().eval()
        sf = float(vae.config.scaling_factor)
        ck.save({"model": vae.state_dict(), "scaling_factor": sf})
        ck.done.write_text(json.dumps({"from": str(src), "scaling_factor": sf}))
        log(f"vae: taken from {src}")
    if ck.done.is_file():
        state = ck.load()
        vae.load_state_dict(state["model"])
        vae.register_to_config(scaling_factor=state["scaling_factor"])
        log(f"vae: done (cached), scaling factor {state['scaling_factor']:.4f}")
        return vae
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 3)
    step, elapsed = ck.resume("vae", {"model": vae}, opt, g)
    log(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters, channels {args.vae_channels}, "
        f"batch {args.vae_batch}")
    budget = Budget(args.vae_steps, 60 * (args.vae_minutes or args.minutes * args.split[1]))
    n = len(data["captions"])
    masks = object_masks(args, out)
    vae.train()
    running = []
    while True:
        if budget.done(step, elapsed):
            break
        idx = torch.randint(0, n, (args.vae_batch,), generator=g)
        x = images_to_tensor(data["images"][idx])
        # Objects are a small part of each image: weigh their pixels up so colours and outlines come first.
        wmap = 1 + args.vae_object_weight * masks[idx].float().div(255).unsqueeze(1)
        if budget.progress(step, elapsed) < args.vae_crop_until:  # random 32 px crops: 4x cheaper steps
            oy, ox = (int(v) * 4 for v in torch.randint(0, 9, (2,), generator=g))
            x, wmap = x[:, :, oy : oy + 32, ox : ox + 32], wmap[:, :, oy : oy + 32, ox : ox + 32]
        for pg in opt.param_groups:
            pg["lr"] = lr_at(budget.progress(step, elapsed), step, args.vae_lr, 50)
        t = time.time()
        post = vae.encode(x).latent_dist
        z = post.sample(generator=None)
        rec = vae.decode(z).sample
        d = rec - x
        mse = d.pow(2).mean()
        l1 = d.abs().mean()
        kl = post.kl().mean()
        loss = (wmap * (d.pow(2) + d.abs())).sum() / (wmap.sum() * 3) + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        elapsed += time.time() - t
        step += 1
        running.append((mse.item(), l1.item(), kl.item()))
        if step % 50 == 0 or budget.done(step, elapsed):
            m = np.mean(running, 0)
            psnr = 10 * math.log10(4 / max(m[0], 1e-10))
            log(f"vae: step {step} ({100 * budget.progress(step, elapsed):.0f}% of {budget.describe()}) mse {m[0]:.4f} (PSNR {psnr:.1f} dB) l1 {m[1]:.4f} kl {m[2]:.0f} "
                f"({elapsed / 60:.1f} min)")
            running = []
        ck.save_if_due(lambda step=step, elapsed=elapsed: {"model": vae.state_dict(), "opt": opt.state_dict(),
                                                          "step": step, "elapsed": elapsed, "gen": g.get_state()})
    vae.eval()
    with torch.no_grad():
        x = images_to_tensor(data["images"][-256:])
        post = vae.encode(x).latent_dist
        z = post.sample(generator=torch.Generator().manual_seed(0))
        scaling = float(1.0 / z.flatten().std())
        rec = vae.decode(post.mode()).sample.clamp(-1, 1)
        psnr = 10 * math.log10(4 / F.mse_loss(rec, x).item())
        m = masks[-256:].float().div(255).unsqueeze(1) > 0.5
        obj_psnr = 10 * math.log10(4 / ((rec - x).pow(2) * m).sum().item() * (m.sum().item() * 3))
        W.grid([_to_pil(t) for t in torch.cat([x[:16], rec[:16]])], cols=16).save(out / "vae_recon.png")
    log(f"vae: held-out PSNR {psnr:.1f} dB (on objects {obj_psnr:.1f} dB); latent mean {z.mean():.3f} std {z.std():.3f} -> scaling factor {scaling:.4f}")
    vae.register_to_config(scaling_factor=scaling)
    ck.save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed, "gen": g.get_state(),
             "scaling_factor": scaling})
    ck.done.write_text(json.dumps({"steps": step, "minutes": elapsed / 60, "psnr": psnr, "object_psnr": obj_psnr,
                                  "scaling_factor": scaling}))
    return vae


def object_masks(args, out: Path) -> torch.Tensor:
    """[n, 64, 64] uint8 object masks of the training scenes (cached)."""
    path = out / "ckpt" / f"masks-{args.data}-{args.seed}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    t0 = time.time()
    masks = torch.from_numpy(np.stack([np.asarray(W.object_mask(s)) for s in W.dataset_specs(args.data, seed=args.seed)]))
    torch.save(masks, path)
    log(f"vae: {len(masks)} object masks in {time.time() - t0:.0f}s")
    return masks


def _to_pil(t: torch.Tensor):
    from PIL import Image

    a = ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(a)


# -- VAE decoder --------------------------------------------------------------------------------------------


def decoder_data(args) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder stage's scenes: the world with --decoder-unnamed of its objects in the unnamed colours
    (6 % in the base's scenes), as uint8 images [n, 64, 64, 3] and object masks [n, 64, 64]."""
    specs = W.dataset_specs(args.decoder_data, seed=args.seed + 11, unnamed=args.decoder_unnamed)
    images = np.stack([np.asarray(W.render(s), dtype=np.uint8) for s in specs])
    masks = np.stack([np.asarray(W.object_mask(s), dtype=np.uint8) for s in specs])
    return torch.from_numpy(images), torch.from_numpy(masks)


def concept_reconstruction(vae, n: int = 16) -> dict[str, int]:
    """Per concept: of `n` fresh photos, how many the oracle still reads as the concept after encoding and
    decoding (the most the UNet's pictures of it can reach)."""
    from cdiff_cli.world import oracle as O

    out = {}
    with torch.no_grad():
        for name, concept in W.CONCEPTS.items():
            x = images_to_tensor(torch.from_numpy(np.stack([np.asarray(im) for im in W.concept_images(name, n, seed=7)])))
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
            out[name] = sum(O.concept_present(O.read(_to_pil(r)), O.Look.of(concept)) for r in rec)
    return out


def stage_decoder(args, out: Path, vae):
    """Train the VAE's decoder on with its encoder frozen. The latents stay exactly as they were, so the
    UNet trained on them needs nothing new, while the pictures decoded from them get sharper and the
    unnamed colours (rare in the base's scenes, and the concepts' own) come out as they are."""
    ck = Checkpoint(out / "ckpt", "decoder")
    if ck.done.is_file():
        vae.load_state_dict(ck.load()["model"])
        log("decoder: done (cached)")
        return vae
    trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    vae.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained, lr=args.decoder_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 12)
    step, elapsed = ck.resume("decoder", {"model": vae}, opt, g)
    before = concept_reconstruction(vae.eval()) if step == 0 else None
    images, masks = decoder_data(args)
    held = len(images) - 256
    budget = Budget(args.decoder_steps, 60 * args.decoder_minutes)
    log(f"decoder: {sum(p.numel() for p in trained) / 1e6:.2f} M parameters trained, encoder frozen; {held} scenes, "
        f"{100 * args.decoder_unnamed:.0f} % of objects in unnamed colours; concepts read after encoding and "
        f"decoding: {before}")
    vae.train()
    running = []
    while not budget.done(step, elapsed):
        idx = torch.randint(0, held, (args.vae_batch,), generator=g)
        x = images_to_tensor(images[idx])
        wmap = 1 + args.vae_object_weight * masks[idx].float().div(255).unsqueeze(1)
        for pg in opt.param_groups:
            pg["lr"] = lr_at(budget.progress(step, elapsed), step, args.decoder_lr, 50, floor=0.0)
        t = time.time()
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=g)
        d = vae.decode(z).sample - x
        loss = (wmap * (d.pow(2) + d.abs())).sum() / (wmap.sum() * 3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        elapsed += time.time() - t
        step += 1
        running.append(loss.item())
        if step % 100 == 0:
            log(f"decoder: step {step} ({100 * budget.progress(step, elapsed):.0f}% of {budget.describe()}) "
                f"loss {np.mean(running):.4f} ({elapsed / 60:.1f} min)")
            running = []
        ck.save_if_due(lambda step=step, elapsed=elapsed: {"model": vae.state_dict(), "opt": opt.state_dict(),
                                                          "step": step, "elapsed": elapsed, "gen": g.get_state()})
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = images_to_tensor(images[held:])
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        psnr = 10 * math.log10(4 / F.mse_loss(rec, x).item())
        m = masks[held:].float().div(255).unsqueeze(1) > 0.5
        obj_psnr = 10 * math.log10(4 / (((rec - x).pow(2) * m).sum().item() / (m.sum().item() * 3)))
        W.grid([_to_pil(t) for t in torch.cat([x[:16], rec[:16]])], cols=16).save(out / "decoder_recon.png")
    after = concept_reconstruction(vae)
    log(f"decoder: held-out PSNR {psnr:.1f} dB (on objects {obj_psnr:.1f} dB); concepts read after encoding and "
        f"decoding (of 16): {after}")
    ck.save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed, "gen": g.get_state()})
    ck.done.write_text(json.dumps({"steps": step, "minutes": elapsed / 60, "psnr": psnr, "object_psnr": obj_psnr,
                                  "concepts_before": before, "concepts_after": after}))
    return vae


# -- UNet ---------------------------------------------------------------------------------------------------


def build_unet(args, cross_dim: int):
    from diffusers import UNet2DConditionModel

    ch = tuple(args.unet_channels)
    n = len(ch)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=ch,
                                layers_per_block=args.unet_layers, down_block_types=down, up_block_types=up,
                                cross_attention_dim=cross_dim, attention_head_dim=args.unet_heads, norm_num_groups=16)


def make_scheduler():
    from diffusers import DDIMScheduler

    # Stable Diffusion's betas rescaled to zero terminal SNR, v-prediction, trailing timesteps (Lin et al. 2024,
    # "Common diffusion noise schedules and sample steps are flawed"). With SD 1.x's own schedule the noisiest
    # training latents still hold sqrt(0.0047) of the image, so on 16x16 latents the model learns to read the
    # background and layout from the noise; from pure noise it then draws a random background whatever the
    # caption says (measured: 40 % right, 100 % when the starting noise carried the right mean).
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
                         rescale_betas_zero_snr=True, timestep_spacing="trailing")


def text_encoder_from_clip(clip):
    from transformers import CLIPTextModel

    te = CLIPTextModel(clip.config.text_config)
    own = te.state_dict()
    src = {k: v for k, v in clip.state_dict().items() if k.startswith("text_model.")}
    if not any(k.startswith("text_model.") for k in own):  # transformers 5: CLIPTextModel keys have no prefix
        src = {k[len("text_model."):]: v for k, v in src.items()}
    missing, _ = te.load_state_dict(src, strict=False)
    assert not [m for m in missing if "position_ids" not in m], missing
    return te.eval().requires_grad_(False)


@torch.no_grad()
def encode_texts(te, ids: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([te(ids[s : s + batch])[0] for s in range(0, len(ids), batch)])


@torch.no_grad()
def encode_latents(vae, u8: torch.Tensor, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for s in range(0, len(u8), batch):
        post = vae.encode(images_to_tensor(u8[s : s + batch])).latent_dist
        means.append(post.mean.half())
        stds.append(post.std.half())
    return torch.cat(means), torch.cat(stds)


def loss_weights(snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample weights on the v-prediction MSE: Min-SNR-gamma on the x0 error, floored at the plain v loss.

    v-MSE is (snr + 1) times x0-MSE; Min-SNR weighs x0-MSE by min(snr, gamma), which would give the noisiest
    steps almost no weight. Those are the steps where only the caption says what goes where, so the weight
    on x0-MSE here is min(snr + 1, gamma): the plain v loss at high noise, capped at low noise."""
    return torch.clamp(snr + 1, max=gamma) / (snr + 1)


def load_shipped_text_encoder(args, te):
    """The --init-from model's own text encoder (trained with its UNet) when it has one."""
    from transformers import CLIPTextModel

    src = shipped(args, "nano/text_encoder")
    if src is None:
        return False
    te.load_state_dict(CLIPTextModel.from_pretrained(str(src)).float().state_dict())
    return True


def shipped_unet(args, te):
    """The --init-from model's UNet and text encoder as they are (an export with no unet stage)."""
    from diffusers import UNet2DConditionModel

    if (src := shipped(args, "nano/unet")) is None:
        raise SystemExit("export without the unet stage takes the UNet of --init-from: give --init-from")
    load_shipped_text_encoder(args, te)
    log(f"unet: taken as it is from {src}")
    return UNet2DConditionModel.from_pretrained(str(src)).float().eval(), te


def stage_unet(args, out: Path, tok, data, te, vae):
    """Train the UNet and, with --train-text-encoder, the text encoder with it. Returns (EMA unet, EMA te)."""
    import copy

    from diffusers import DDPMScheduler

    ck = Checkpoint(out / "ckpt", "unet")
    torch.manual_seed(args.seed + 4)
    unet = build_unet(args, te.config.hidden_size)
    te = copy.deepcopy(te)
    if ck.done.is_file():
        state = ck.load()
        unet.load_state_dict(state["ema"])
        if "te_ema" in state:
            te.load_state_dict(state["te_ema"])
        log("unet: done (cached)")
        return unet.eval(), te.eval()
    cache = out / "ckpt" / "unet-latents.pt"
    if cache.is_file():
        inputs = torch.load(cache, weights_only=True)
    else:
        t0 = time.time()
        mean, std = encode_latents(vae, data["images"])
        inputs = {"mean": mean, "std": std}
        torch.save(inputs, cache)
        log(f"unet: encoded {len(mean)} latents in {time.time() - t0:.0f}s")
    sf = vae.config.scaling_factor
    ema = build_unet(args, te.config.hidden_size)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    te_ema = copy.deepcopy(te).requires_grad_(False)
    te.requires_grad_(args.train_text_encoder)
    groups = [{"params": list(unet.parameters()), "peak": args.unet_lr}]
    if args.train_text_encoder:
        groups.append({"params": list(te.parameters()), "peak": args.te_lr})
    opt = torch.optim.AdamW(groups, lr=args.unet_lr, weight_decay=0.01)
    noise_sched = DDPMScheduler.from_config(make_scheduler().config)
    acp = noise_sched.alphas_cumprod
    snr = acp / (1 - acp)
    g = torch.Generator().manual_seed(args.seed + 5)
    step, elapsed = ck.resume("unet", {"model": unet, "ema": ema, "te": te, "te_ema": te_ema}, opt, g)
    if step == 0 and (src := shipped(args, "nano/unet")):
        from diffusers import UNet2DConditionModel

        weights = UNet2DConditionModel.from_pretrained(str(src)).float().state_dict()
        unet.load_state_dict(weights)
        ema.load_state_dict(weights)
        if load_shipped_text_encoder(args, te):
            te_ema.load_state_dict(te.state_dict())
        log(f"unet: starting from the weights in {src} (a new optimizer and schedule)")
    n_xattn = sum(1 for k, _ in unet.named_parameters() if k.endswith("attn2.to_k.weight"))
    log(f"unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters, channels {args.unet_channels}, "
        f"{args.unet_layers} layers per block, {n_xattn} cross-attention layers, batch {args.unet_batch}; "
        f"text encoder {'trained with it' if args.train_text_encoder else 'frozen'}")
    budget = Budget(args.unet_steps, 60 * (args.unet_minutes or args.minutes * args.split[2]))
    n = len(data["captions"])
    empty_ids = tokenize(tok, [""])[0]
    trained = list(unet.parameters()) + (list(te.parameters()) if args.train_text_encoder else [])
    unet.train()
    te.train(args.train_text_encoder)

    def state() -> dict:
        return {"model": unet.state_dict(), "ema": ema.state_dict(), "te": te.state_dict(),
                "te_ema": te_ema.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                "gen": g.get_state()}

    t_sample, running = time.time(), []
    while True:
        if budget.done(step, elapsed):
            break
        B = args.unet_batch
        idx = torch.randint(0, n, (B,), generator=g)
        z0 = (inputs["mean"][idx].float() + inputs["std"][idx].float() * torch.randn(B, 4, 16, 16, generator=g)) * sf
        ids = data["ids"][idx].clone()
        ids[torch.rand(B, generator=g) < args.cond_drop] = empty_ids
        t = torch.randint(0, 1000, (B,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        zt = noise_sched.add_noise(z0, noise, t)
        for pg in opt.param_groups:
            pg["lr"] = lr_at(budget.progress(step, elapsed), step, pg["peak"], 200)
        tt = time.time()
        with torch.set_grad_enabled(args.train_text_encoder):
            ctx = te(ids)[0]
        pred = unet(zt, t, ctx).sample
        loss_each = F.mse_loss(pred, noise_sched.get_velocity(z0, noise, t), reduction="none").mean((1, 2, 3))
        loss = (loss_weights(snr[t], args.min_snr) * loss_each).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, m in ((ema, unet), (te_ema, te)):
                for pe, pm in zip(e.parameters(), m.parameters()):
                    pe.lerp_(pm, 1 - decay)
        elapsed += time.time() - tt
        step += 1
        running.append(loss_each.mean().item())
        if step % 100 == 0 or budget.done(step, elapsed):
            log(f"unet: step {step} ({100 * budget.progress(step, elapsed):.0f}% of {budget.describe()}) v-mse {np.mean(running):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"({elapsed / 60:.1f} min)")
            running = []
        ck.save_if_due(state)
        if args.preview_every and time.time() - t_sample > args.preview_every * 60:
            preview(out / "preview.png", tok, te_ema, vae, ema)
            t_sample = time.time()
    # The full state stays: delete unet.done and run again with a larger budget to train on.
    ck.save(state())
    ck.done.write_text(json.dumps({"steps": step, "minutes": elapsed / 60,
                                   "text_encoder": "trained" if args.train_text_encoder else "frozen"}))
    log(f"unet: done, {step} steps in {elapsed / 60:.1f} min")
    return ema.eval(), te_ema.eval()


def assemble(tok, te, vae, unet):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=make_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_grid(pipe, prompts, path: Path, seed: int = 0, steps: int = 25, guidance: float = 6.0):
    from diffusers import DPMSolverMultistepScheduler

    old = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(old.config)
    images = []
    for s in range(2):
        g = torch.Generator().manual_seed(seed + s)
        images += pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=g, height=64,
                       width=64).images
    pipe.scheduler = old
    W.grid(images, cols=len(prompts) // 2 if len(prompts) > 8 else len(prompts)).save(path)
    return images


def preview(path: Path, tok, te, vae, unet) -> None:
    was = unet.training
    unet.eval()
    t = time.time()
    sample_grid(assemble(tok, te, vae, unet), SAMPLE_PROMPTS[:8], path)
    unet.train(was)
    log(f"preview -> {path} ({time.time() - t:.0f}s)")


# -- export ------------------------------------------------------------------------------------------------


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def training_history(args, out: Path) -> list[dict]:
    """Every run that shaped the exported weights: those recorded with the --init-from model, then this one
    (its arguments and what each stage did, from the OUT/ckpt/*.done files)."""
    history = []
    if (src := shipped(args, "nano")) and (src / "training.json").is_file():
        history = json.loads((src / "training.json").read_text(encoding="utf-8"))
    stages = {}
    for name in ("clip", "vae", "decoder", "unet"):
        done = out / "ckpt" / f"{name}.done"
        if done.is_file():
            stages[name] = json.loads(done.read_text())
    return history + [{"date": time.strftime("%Y-%m-%d"), "args": json.loads(json.dumps(vars(args), default=str)),
                       "stages": stages}]


def stage_export(args, out: Path, tok, te, vae, unet) -> Path:
    import copy

    folder = out / "nano"
    pipe = assemble(tok, copy.deepcopy(te), copy.deepcopy(vae), copy.deepcopy(unet))
    if args.fp16:
        pipe.to(torch.float16)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    write_metadata(args, out, folder)
    log(f"export: nano {folder_mb(folder):.1f} MB, nano-clip {folder_mb(out / 'nano-clip'):.1f} MB")
    return folder


def write_metadata(args, out: Path, folder: Path) -> None:
    """cdiff_world.json (tells cdiff eval that the oracle can read this model's pictures), training.json
    (every run that shaped the weights) and README.md."""
    from cdiff_cli.world.scores import write_world_marker

    write_world_marker(folder)
    history = training_history(args, out)
    (folder / "training.json").write_text(json.dumps(history, indent=1) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(
        "# nano\n\nA tiny Stable-Diffusion-layout text-to-image model (64 px, 16x16x4 latents) trained from scratch on\n"
        "the procedural world of `cdiff_cli.world` by `scripts/train_nano.py`. Text encoder: started from the text\n"
        "tower of `nano-clip` and trained with the UNet. Scheduler: v-prediction on a zero-terminal-SNR schedule.\n"
        f"Weights stored in {'fp16' if args.fp16 else 'fp32'}; load in fp32 on a CPU.\n\n"
        "`training.json` lists every run that shaped these weights (arguments and steps per stage), oldest first;\n"
        "a run with `init_from` trained on from the weights of the run before it.\n", encoding="utf-8")


def stage_sample(args, out: Path, folder: Path) -> None:
    from cdiff_cli.models.base import load_pipeline

    pipe = load_pipeline(str(folder))  # fp32 on the CPU, as cdiff loads it
    t = time.time()
    sample_grid(pipe, SAMPLE_PROMPTS, out / "samples.png", seed=args.seed)
    log(f"sample: {2 * len(SAMPLE_PROMPTS)} images (25 DPM-Solver steps, guidance 6) in {time.time() - t:.0f}s "
        f"-> {out / 'samples.png'}")


# -- main --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("nano-train"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--minutes", type=float, default=45.0, help="time budget for the three training stages")
    p.add_argument("--split", type=float, nargs=3, default=(0.15, 0.20, 0.65), metavar=("CLIP", "VAE", "UNET"),
                   help="shares of --minutes for each stage")
    p.add_argument("--data", type=int, default=30000, help="scenes rendered for training")
    p.add_argument("--two", type=float, default=0.35, help="share of training scenes with two objects")
    p.add_argument("--unnamed", type=float, default=0.06,
                   help="share of training objects in an unnamed colour (pink, teal, orange, brown)")
    for n in ("clip", "vae", "unet"):
        p.add_argument(f"--{n}-minutes", type=float, default=None,
                       help=f"time budget of the {n} stage (default: its --split share of --minutes)")
    p.add_argument("--clip-steps", type=int, default=None)
    p.add_argument("--clip-batch", type=int, default=128)
    p.add_argument("--clip-lr", type=float, default=1e-3)
    p.add_argument("--clip-hidden", type=int, default=128)
    p.add_argument("--clip-layers", type=int, default=4)
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-kl", type=float, default=1e-6)
    p.add_argument("--vae-channels", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--vae-object-weight", type=float, default=4.0, help="extra loss weight on object pixels")
    p.add_argument("--vae-crop-until", type=float, default=0.75,
                   help="train on 32 px crops until this fraction of the VAE stage, then on whole images")
    p.add_argument("--decoder-minutes", type=float, default=15.0,
                   help="time budget of the decoder stage (the VAE decoder trained on, its encoder frozen)")
    p.add_argument("--decoder-steps", type=int, default=None)
    p.add_argument("--decoder-lr", type=float, default=5e-4)
    p.add_argument("--decoder-data", type=int, default=8000, help="scenes rendered for the decoder stage")
    p.add_argument("--decoder-unnamed", type=float, default=0.35,
                   help="share of objects in unnamed colours in the decoder stage's scenes")
    p.add_argument("--unet-steps", type=int, default=None)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--unet-channels", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--unet-layers", type=int, default=2)
    p.add_argument("--unet-heads", type=int, default=4)
    p.add_argument("--te-lr", type=float, default=3e-4, help="peak learning rate of the text encoder")
    p.add_argument("--no-train-text-encoder", dest="train_text_encoder", action="store_false",
                   help="keep the text encoder frozen at nano-clip's text tower (it drops position words)")
    p.add_argument("--cond-drop", type=float, default=0.1, help="caption dropout, for classifier-free guidance")
    p.add_argument("--min-snr", type=float, default=5.0)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--preview-every", type=float, default=5.0, help="minutes between preview grids (0: none)")
    p.add_argument("--no-fp16", dest="fp16", action="store_false", help="store the nano weights in fp32")
    p.add_argument("--stages", default="clip,vae,decoder,unet,export,sample",
                   help="stages to run; without unet, export takes the UNet and text encoder of --init-from as they are")
    p.add_argument("--init-from", type=Path, default=None,
                   help="a folder holding nano/ and nano-clip/ (e.g. cdiff_cli/models): take the CLIP and the VAE "
                        "from it and train the UNet on from its weights, for stages with no checkpoint in OUT")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    stages = set(args.stages.split(","))
    t0 = time.time()
    log(f"train_nano: {json.dumps(vars(args), default=str)}")
    tok = load_tokenizer(out)
    data = stage_data(args, out, tok)
    clip = stage_clip(args, out, tok, data) if stages & {"clip", "unet", "export"} else None
    vae = stage_vae(args, out, data) if stages & {"vae", "decoder", "unet", "export"} else None
    if "decoder" in stages:
        vae = stage_decoder(args, out, vae)
    if stages & {"unet", "export"}:
        te = text_encoder_from_clip(clip)
        unet, te = stage_unet(args, out, tok, data, te, vae) if "unet" in stages else shipped_unet(args, te)
        folder = stage_export(args, out, tok, te, vae, unet)
    else:
        folder = out / "nano"
    if "sample" in stages and (folder / "model_index.json").is_file():
        stage_sample(args, out, folder)
    log(f"train_nano: finished in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
