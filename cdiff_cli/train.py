"""Custom Diffusion training: cross-attention k/v (or all of attn2) plus one new token per concept.

What trains, and nothing else:
- the UNet's `attn2.to_k/to_v` weights (mode "kv"), or also `attn2.to_q/to_out` (mode "crossattn");
- one embedding row per concept token, held in a separate fp32 parameter that a forward hook swaps
  into the embedding output, so every other row of the embedding table stays bit-identical and the
  optimizer state is a few vectors instead of the whole table.
Trainable weights and optimizer state stay fp32 under bf16/fp16 autocast. Key and value at the
start-of-text position are detached, as in the reference. Target batches use the method's
augmentation and a loss masked to the pasted box; regularisation batches use a plain MSE (weight 1).
"""

from __future__ import annotations

import math
import random
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cdiff_cli.data import ImageItem, apply_augmentation, latent_mask, masked_mse, open_rgb, sample_augmentation, to_tensor
from cdiff_cli.delta import Delta
from cdiff_cli.errors import CdiffError
from cdiff_cli.layers import read_weights, trainable_names
from cdiff_cli.progress import SILENT, Progress
from cdiff_cli.tokens import add_tokens, initial_embedding


@dataclass
class Concept:
    """One concept of a run: its token, its class word and its target images."""

    token: str
    class_word: str
    images: list[ImageItem]
    reg: list[ImageItem] = field(default_factory=list)

    @property
    def prompt(self) -> str:
        return f"photo of a {self.token} {self.class_word}"


@dataclass
class TrainConfig:
    steps: int = 250
    batch_size: int = 8  # images per step, split between target and regularisation images
    lr: float = 1e-5  # per image; the optimizer gets lr * batch_size * processes when scale_lr
    scale_lr: bool = True
    mode: str = "kv"
    resolution: int | None = None  # None: the base's native size (512 for SD 1.x)
    seed: int = 0
    aug: bool = True
    hflip: bool = True
    precision: str = "fp32"
    prior_weight: float = 1.0
    weight_decay: float = 1e-2
    gradient_checkpointing: bool = False

    def effective_lr(self, processes: int = 1) -> float:
        return self.lr * self.batch_size * processes if self.scale_lr else self.lr


@dataclass
class TrainResult:
    delta: Delta
    losses: list[float]
    seconds: float
    effective_lr: float


def split_batch(batch_size: int, with_reg: bool) -> tuple[int, int]:
    """Target and regularisation images per step: about half and half."""
    if not with_reg:
        return batch_size, 0
    n_target = max(1, math.ceil(batch_size / 2))
    return n_target, max(1, batch_size - n_target)


def balanced_slots(step: int, n_slots: int, n_concepts: int) -> list[int]:
    """Concept index of each slot of a step, round-robin across steps so every concept gets equal share."""
    return [(step * n_slots + i) % n_concepts for i in range(n_slots)]


class _Cycler:
    """Endless shuffled passes over a list (each item once per pass)."""

    def __init__(self, n: int, rng: random.Random):
        self.n, self.rng, self.order = n, rng, []

    def next(self) -> int:
        if not self.order:
            self.order = list(range(self.n))
            self.rng.shuffle(self.order)
        return self.order.pop()


class _TokenRows(torch.nn.Module):
    """Trainable rows for the new tokens, swapped into the embedding output by a forward hook."""

    def __init__(self, ids: list[int], init: torch.Tensor):
        super().__init__()
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.rows = torch.nn.Parameter(init.clone().float())

    def hook(self, module, inputs, output):
        input_ids = inputs[0]
        out = output
        for k in range(len(self.ids)):
            hit = (input_ids == self.ids[k]).unsqueeze(-1)
            if bool(hit.any()):
                out = torch.where(hit, self.rows[k].to(out.dtype), out)
        return out


def _detach_first_hook(module, inputs, output):
    # The reference detaches k and v at the start-of-text position: it is the same for every prompt.
    return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)


def train(
    pipe,
    concepts: list[Concept],
    cfg: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    progress: Progress = SILENT,
    accelerator=None,
) -> TrainResult:
    """Train the concepts jointly into one delta. `pipe` is modified in place (weights and tokenizer)."""
    if not concepts:
        raise CdiffError("nothing to train: no concept given")
    toks = [c.token for c in concepts]
    if len({t.lower() for t in toks}) != len(toks):
        raise CdiffError(f"each concept needs its own token, got {toks}")
    device = torch.device(device)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_sched = _training_scheduler(pipe)
    factor = int(pipe.vae_scale_factor)
    if cfg.resolution % factor:
        raise CdiffError(f"--resolution must be a multiple of {factor}")

    # New tokens: added to the tokenizer, initialised from their class word.
    init = torch.stack([initial_embedding(tok, te, c.class_word) for c in concepts])
    ids = add_tokens(tok, te, toks, init)
    token_rows = _TokenRows(ids, init).to(device)

    # Freeze everything, then open exactly the trainable cross-attention parameters (kept fp32).
    for m in (unet, vae, te):
        m.requires_grad_(False)
    names = trainable_names(unet, cfg.mode)
    params = dict(unet.named_parameters())
    for n in names:
        p = params[n]
        p.data = p.data.float()
        p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    processes = accelerator.num_processes if accelerator is not None else 1
    lr = cfg.effective_lr(processes)
    opt_kwargs = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(
        [
            {"params": [params[n] for n in names], "weight_decay": cfg.weight_decay},
            {"params": [token_rows.rows], "weight_decay": 0.0},
        ],
        lr=lr,
        **opt_kwargs,
    )

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None

    with_reg = any(c.reg for c in concepts)
    n_target, n_reg = split_batch(cfg.batch_size, with_reg)
    target_cycles = [_Cycler(len(c.images), rng) for c in concepts]
    reg_concepts = [i for i, c in enumerate(concepts) if c.reg]
    reg_cycles = {i: _Cycler(len(concepts[i].reg), rng) for i in reg_concepts}
    pixels = _PixelCache(cfg.resolution)
    reg_latents: dict[tuple[int, int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
    reg_text: dict[str, torch.Tensor] = {}
    vae_dtype = next(vae.parameters()).dtype

    def encode_latents(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            dist = vae.encode(images.to(device, vae_dtype)).latent_dist
        return dist.mean, dist.std

    def encode_text(prompts: list[str], grad: bool) -> torch.Tensor:
        ids_ = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        with torch.set_grad_enabled(grad):
            return te(ids_.input_ids.to(device))[0]

    hooks = []
    losses: list[float] = []
    t0 = time.perf_counter()
    with ExitStack() as stack:
        hooks.append(te.get_input_embeddings().register_forward_hook(token_rows.hook))
        for n, mod in unet.named_modules():
            if n.endswith(("attn2.to_k", "attn2.to_v")):
                hooks.append(mod.register_forward_hook(_detach_first_hook))
        stack.callback(lambda: [h.remove() for h in hooks])
        with progress.task("training", cfg.steps) as bar:
            for step in range(cfg.steps):
                # -- target half: augmented images, caption prefixes, masked loss --------------------
                imgs, masks, prompts = [], [], []
                for ci in balanced_slots(step, n_target, len(concepts)):
                    c = concepts[ci]
                    item = c.images[target_cycles[ci].next()]
                    a = sample_augmentation(rng, cfg.resolution, aug=cfg.aug, hflip=cfg.hflip)
                    imgs.append(apply_augmentation(pixels.get(item.path), a))
                    masks.append(latent_mask(a, cfg.resolution, factor))
                    prompts.append(a.prefix + c.prompt)
                mean, std = encode_latents(torch.stack(imgs))
                latents = [mean + std * torch.randn_like(std)]
                # -- regularisation half: fixed images, latents and caption features cached ---------
                reg_prompts = []
                if n_reg:
                    for k, slot in enumerate(balanced_slots(step, n_reg, len(reg_concepts))):
                        ci = reg_concepts[slot]
                        j = reg_cycles[ci].next()
                        flip = cfg.hflip and rng.random() < 0.5
                        key = (ci, j, flip)
                        if key not in reg_latents:
                            img = pixels.get(concepts[ci].reg[j].path)
                            reg_latents[key] = encode_latents((img.flip(-1) if flip else img)[None])
                        m_, s_ = reg_latents[key]
                        latents.append(m_ + s_ * torch.randn_like(s_))
                        reg_prompts.append(concepts[ci].reg[j].caption or f"photo of a {concepts[ci].class_word}")
                latents = torch.cat(latents) * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                t = torch.randint(0, noise_sched.config.num_train_timesteps, (latents.shape[0],), device=device)
                noisy = noise_sched.add_noise(latents, noise, t)
                target = noise if noise_sched.config.prediction_type == "epsilon" else noise_sched.get_velocity(latents, noise, t)

                with autocast:
                    text = [encode_text(prompts, grad=True)]
                    for p in reg_prompts:
                        if p not in reg_text:
                            reg_text[p] = encode_text([p], grad=False).detach()
                        text.append(reg_text[p])
                    enc = torch.cat([x.to(text[0].dtype) for x in text])
                    pred = unet(noisy.to(next(unet.parameters()).dtype), t, enc).sample
                mask = torch.stack(masks).to(device)
                loss = masked_mse(pred[:n_target], target[:n_target], mask)
                if n_reg:
                    loss = loss + cfg.prior_weight * F.mse_loss(pred[n_target:].float(), target[n_target:].float())
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    (accelerator.backward(loss) if accelerator is not None else loss.backward())
                    optimizer.step()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise CdiffError(f"training diverged at step {step + 1} (loss {value}); try a lower --lr")
                losses.append(value)
                bar.advance(1, loss=value)
    unet.eval()
    if cfg.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    for n in names:
        params[n].requires_grad_(False)

    # Write the learned rows into the table so the pipeline can be used right away.
    with torch.no_grad():
        table = te.get_input_embeddings().weight
        table[torch.tensor(ids, device=table.device)] = token_rows.rows.detach().to(table.dtype)
    delta = Delta(read_weights(unet, names), toks, token_rows.rows.detach().cpu().float().clone(), cfg.mode)
    return TrainResult(delta, losses, time.perf_counter() - t0, lr)


class _PixelCache:
    """Decoded, square-cropped, resized images in memory (decoding a JPEG every step is wasteful)."""

    def __init__(self, size: int):
        self.size, self.items = size, {}

    def get(self, path: Path) -> torch.Tensor:
        if path not in self.items:
            self.items[path] = to_tensor(open_rgb(path), self.size)
        return self.items[path]


def _training_scheduler(pipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
