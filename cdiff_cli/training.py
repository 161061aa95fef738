"""Custom Diffusion training: cross-attention k/v (or all of attn2) plus one new token per concept.

What trains, and nothing else:
- the UNet's `attn2.to_k/to_v` weights (mode "kv"), or also `attn2.to_q/to_out` (mode "crossattn");
- one embedding row per concept token, held in a separate fp32 parameter that a forward hook swaps
  into the embedding output, so every other row of the embedding table stays bit-identical and the
  optimizer state is a few vectors instead of the whole 49,408-row table.
Trainable weights and optimizer state stay fp32 under bf16/fp16 autocast. Key and value at the
start-of-text position are detached, as in the reference. Target batches use the method's
augmentation and a loss masked to the pasted box; regularisation batches use a plain MSE (weight 1).

Speed: nothing that does not change is recomputed. Every regularisation image (both flips) and a
pool of `aug_pool` augmented variants of every target image are VAE-encoded once, in batches, before
the first step; the VAE then leaves the accelerator. Caption features of regularisation images are
cached. Under `accelerate launch` each process trains on its own draws and the trainable gradients
are all-reduced directly (no wrapper module around the UNet).

Memory: while training, the frozen convolutions and GEGLU layers keep less for the backward
(`frozen_ops.saving_less`; the gradients are bit-identical); for a caller that is done with the
pipeline (`keep_pipe=False`), the token tables are cut down to the rows the run's prompts use. `offload`
keeps the frozen UNet and text-encoder weights in CPU memory, one layer (one checkpointed block in the
backward) on the device at a time (`offload.py`).
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cdiff_cli import frozen_ops, offload, textcond
from cdiff_cli.checkpoint import Checkpointer, StopRequested, StopSignals
from cdiff_cli.data import (
    FAR_PREFIXES,
    NEAR_PREFIXES,
    ImageItem,
    apply_augmentation,
    latent_mask,
    masked_mse_per_sample,
    open_rgb,
    sample_augmentation,
    to_tensor,
)
from cdiff_cli.delta import Delta
from cdiff_cli.errors import CdiffError, reason
from cdiff_cli.layers import read_weights, trainable_names
from cdiff_cli.progress import SILENT, Progress
from cdiff_cli.prompts import class_prompt, instance_prompt
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
        return instance_prompt(self.token, self.class_word)

    def target_caption(self, i: int) -> str:
        """The caption of target image `i`: its own (`ImageItem.caption`, the token already in it), else
        the template's "photo of a TOKEN CLASS"."""
        return self.images[i].caption or self.prompt

    def target_captions(self) -> list[str]:
        """The distinct captions of the target images, in order."""
        return list(dict.fromkeys(self.target_caption(i) for i in range(len(self.images))))

    def reg_caption(self, j: int) -> str:
        return self.reg[j].caption or class_prompt(self.class_word)

    def prompts(self) -> list[str]:
        """Every prompt a run can encode for this concept: its prompt under each augmentation prefix,
        and its regularisation captions."""
        return [p + t for t in self.target_captions() for p in ("", *FAR_PREFIXES, *NEAR_PREFIXES)] + \
            [self.reg_caption(j) for j in range(len(self.reg))]


@dataclass
class TrainConfig:
    steps: int = 250
    batch_size: int = 8  # images per step and process, split between target and regularisation images
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
    aug_pool: int = 16  # augmented variants encoded once per target image; 0 = encode fresh draws every step
    micro_batch: int = 0  # images per forward/backward (gradients accumulate); 0 = the whole batch at once
    low_memory: bool = False  # recorded for the manifest; see `low_memory_config`
    offload: bool = False  # frozen UNet and text-encoder weights in CPU memory, one layer on the device at a time (with checkpointing)

    def effective_lr(self, processes: int = 1) -> float:
        return self.lr * self.batch_size * processes if self.scale_lr else self.lr


@dataclass
class TrainResult:
    delta: Delta
    losses: list[float]
    seconds: float
    effective_lr: float
    processes: int = 1
    sample_seconds: float = 0.0  # spent making sample grids (not in `seconds`)


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
        hits = inputs[0].unsqueeze(-1) == self.ids  # [B, L, n_tokens]; no host sync
        which = hits.to(torch.long).argmax(-1)
        return torch.where(hits.any(-1, keepdim=True), self.rows[which].to(output.dtype), output)


def _detach_first_hook(module, inputs, output):
    # The reference detaches k and v at the start-of-text position: it is the same for every prompt.
    return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)


@dataclass
class _Latent:
    mean: torch.Tensor
    std: torch.Tensor
    mask: torch.Tensor | None = None
    prefix: str = ""

    def sample(self) -> torch.Tensor:
        return self.mean + self.std * torch.randn_like(self.std)


# Images per VAE encoding while caching latents. Batching the VAE buys little speed, and its
# activations grow with the batch: at 512 px 0.3 GiB per image in half precision (traced), so at batch 8
# the caching, not the training step, would set the run's peak. On a GPU one at a time under
# --low-memory/--offload, whose steps need about 2.0/0.6 GiB (benchmarks/trace_memory.py).
ENCODE_BATCH = 2
ENCODE_BATCH_LOW_MEMORY = 1


class _Encoder:
    """VAE encoding in batches, returning the latent distribution per image."""

    def __init__(self, vae, device, batch: int = ENCODE_BATCH):
        self.vae, self.device, self.batch = vae, device, batch
        self.dtype = next(vae.parameters()).dtype

    @torch.no_grad()
    def __call__(self, images: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for s in range(0, len(images), self.batch):
            x = torch.stack(images[s : s + self.batch]).to(self.device, self.dtype)
            dist = self.vae.encode(x).latent_dist
            out += list(zip(dist.mean.float(), dist.std.float()))
        return out


def _distributed(accelerator) -> bool:
    return accelerator is not None and accelerator.num_processes > 1


def train(
    pipe,
    concepts: list[Concept],
    cfg: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    progress: Progress = SILENT,
    accelerator=None,
    checkpointer: Checkpointer | None = None,
    resume: bool = False,
    keep_pipe: bool = True,
    sampler=None,
) -> TrainResult:
    """Train the concepts jointly into one delta. `pipe` is modified in place (weights and tokenizer).

    With a `checkpointer`, the run saves its state every `checkpointer.every` steps and when Ctrl-C or
    SIGTERM asks it to stop (then raising `StopRequested`); `resume` continues from the saved state and
    ends with the same weights as an uninterrupted run. Under a multi-process launch every process passes
    the same `checkpointer`; only the main one reads or writes its folder.

    `keep_pipe=False` says the caller will not use `pipe` again, so what the steps do not read is freed:
    on a CPU, where it has nowhere to be moved, the VAE's weights (330 MB for SD 1.x in fp32) once the
    latents are cached, and everywhere the token-embedding rows that no prompt of the run uses (72 MB of
    SD 1.x's table in half precision; `textcond.keep_rows_for`). The delta is the same, but the pipeline
    can no longer encode other prompts. Measured on a CPU, the peak RSS falls by 100-150 MB for the VAE
    (fp32) and by 80 MB for the table (bf16).

    A `sampler` (`samples.TrainingSampler`) makes a grid of samples after the steps it asks for, on the main
    process, with the weights and tokens as they are then; the VAE and its prompts' rows are kept for it."""
    if not concepts:
        raise CdiffError("nothing to train: no concept given")
    toks = [c.token for c in concepts]
    if len({t.lower() for t in toks}) != len(toks):
        raise CdiffError(f"each concept needs its own token, got {toks}")
    device = torch.device(device)
    rank = accelerator.process_index if _distributed(accelerator) else 0
    processes = accelerator.num_processes if _distributed(accelerator) else 1
    rng = random.Random(cfg.seed * 1009 + rank)  # each process draws its own data
    torch.manual_seed(cfg.seed * 1009 + rank)
    unet, vae = pipe.unet, pipe.vae
    noise_sched = _training_scheduler(pipe)
    factor = int(pipe.vae_scale_factor)
    res = cfg.resolution or int(unet.config.sample_size) * factor
    if res % factor:
        raise CdiffError(f"--resolution must be a multiple of {factor}")

    # New tokens: added to the tokenizer, initialised from their class word.
    # SDXL: every token gets a row in each of its two text encoders.
    rows_of = []  # (text encoder, ids, _TokenRows) per encoder
    for tok_i, te_i in textcond.encoders(pipe):
        init = torch.stack([initial_embedding(tok_i, te_i, c.class_word) for c in concepts])
        ids_i = add_tokens(tok_i, te_i, toks, init)
        rows_of.append((te_i, ids_i, _TokenRows(ids_i, init).to(device)))

    # Freeze everything, then open exactly the trainable cross-attention parameters (kept fp32).
    for m in (unet, vae, *(te_i for te_i, _, _ in rows_of)):
        m.requires_grad_(False)
    names = trainable_names(unet, cfg.mode)
    # Only the trainable ones: a reference to a frozen parameter would keep it on the device under --offload.
    wanted = set(names)
    params = {n: p for n, p in unet.named_parameters() if n in wanted}
    for n in names:
        params[n].data = params[n].data.to(device, torch.float32)
        params[n].requires_grad_(True)
    row_params = [r.rows for _, _, r in rows_of]
    trainable = [params[n] for n in names] + row_params

    # The pipeline may wait in CPU memory (workflows loads it there for --low-memory and --offload on a
    # GPU): each phase brings to the device what it runs, so the whole base is never there at once.
    homes = {m: next(m.parameters()).device for m in (unet, vae, *(te_i for te_i, _, _ in rows_of))}

    # -- cache latents: target pools and every regularisation image, both flips -------------------
    vae.to(device)
    encode = _Encoder(vae, device, batch=ENCODE_BATCH_LOW_MEMORY if base_waits_in_cpu_memory(cfg, device) else ENCODE_BATCH)
    pixels = _PixelCache(res)
    with_reg = any(c.reg for c in concepts)
    pool_size = cfg.aug_pool if (cfg.aug or cfg.hflip) else 1
    pools: list[list[list[_Latent]]] = []
    reg_lat: list[list[list[_Latent]]] = []
    if pool_size > 0:
        jobs = []  # (concept, image, augmentation)
        for ci, c in enumerate(concepts):
            for ii, item in enumerate(c.images):
                for _ in range(pool_size):
                    jobs.append((ci, ii, sample_augmentation(rng, res, aug=cfg.aug, hflip=cfg.hflip)))
        reg_jobs = [(ci, j, flip) for ci, c in enumerate(concepts) for j in range(len(c.reg)) for flip in ((False, True) if cfg.hflip else (False,))]
        pools = [[[] for _ in c.images] for c in concepts]
        reg_lat = [[[] for _ in c.reg] for c in concepts]
        with progress.task("encoding latents", len(jobs) + len(reg_jobs)) as bar:
            for s in range(0, len(jobs), encode.batch):
                chunk = jobs[s : s + encode.batch]
                imgs = [apply_augmentation(pixels.get(concepts[ci].images[ii].path), a) for ci, ii, a in chunk]
                for (ci, ii, a), (m, sd) in zip(chunk, encode(imgs)):
                    pools[ci][ii].append(_Latent(m, sd, latent_mask(a, res, factor).to(device), a.prefix))
                bar.advance(len(chunk))
            for s in range(0, len(reg_jobs), encode.batch):
                chunk = reg_jobs[s : s + encode.batch]
                imgs = []
                for ci, j, flip in chunk:
                    img = pixels.get(concepts[ci].reg[j].path)
                    imgs.append(img.flip(-1) if flip else img)
                for (ci, j, flip), (m, sd) in zip(chunk, encode(imgs)):
                    reg_lat[ci][j].append(_Latent(m, sd))
                bar.advance(len(chunk))
        pixels.items.clear()
        if device.type != "cpu":
            vae.to("cpu")  # not needed any more: give its memory to the UNet's activations
        elif not keep_pipe and sampler is None:
            vae.to("meta")  # frees the weights; only its config (the latent scaling factor) is read below
    if not keep_pipe:
        textcond.keep_rows_for(pipe, [p for c in concepts for p in c.prompts()] + (sampler.prompts + [""] if sampler else []))

    if not cfg.offload:  # (under --offload, offload.frozen_parts_offloaded places them)
        for m in (unet, *(te_i for te_i, _, _ in rows_of)):
            m.to(device)

    # --offload needs checkpointing: without it autograd would keep every layer's weights on the device.
    checkpointing = cfg.gradient_checkpointing or cfg.offload
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    lr = cfg.effective_lr(processes)
    groups = [{"params": row_params, "weight_decay": 0.0}]
    if names:  # empty in the textual-inversion baseline mode
        groups.insert(0, {"params": [params[n] for n in names], "weight_decay": cfg.weight_decay})
    optimizer = torch.optim.AdamW(
        groups,
        lr=lr,
        **({"fused": True} if device.type == "cuda" else {}),
    )
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None

    n_target, n_reg = split_batch(cfg.batch_size, with_reg)
    target_cycles = [_Cycler(len(c.images), rng) for c in concepts]
    reg_concepts = [i for i, c in enumerate(concepts) if c.reg]
    reg_cycles = {i: _Cycler(len(concepts[i].reg), rng) for i in reg_concepts}
    reg_text: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    unet_dtype = unet.conv_in.weight.dtype

    def encode_text(prompts: list[str], grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(k/v input features, SDXL's pooled output or None)."""
        with torch.set_grad_enabled(grad):
            hidden, pooled, _ = textcond.encode(pipe, prompts, device)
            return hidden, pooled

    def draw_target(ci: int) -> tuple[_Latent, str]:
        """A latent of the next target image of concept `ci`, and its caption under its augmentation."""
        ii = target_cycles[ci].next()
        caption = concepts[ci].target_caption(ii)
        if pools:
            lt = rng.choice(pools[ci][ii])
            return lt, lt.prefix + caption
        a = sample_augmentation(rng, res, aug=cfg.aug, hflip=cfg.hflip)
        (m, sd), = encode([apply_augmentation(pixels.get(concepts[ci].images[ii].path), a)])
        return _Latent(m, sd, latent_mask(a, res, factor).to(device), a.prefix), a.prefix + caption

    def draw_reg(ci: int) -> tuple[_Latent, str]:
        j = reg_cycles[ci].next()
        caption = concepts[ci].reg_caption(j)
        if reg_lat:
            return rng.choice(reg_lat[ci][j]), caption
        img = pixels.get(concepts[ci].reg[j].path)
        flip = cfg.hflip and rng.random() < 0.5
        (m, sd), = encode([img.flip(-1) if flip else img])
        return _Latent(m, sd), caption

    def step_loss(part, n_target: int, n_reg: int) -> torch.Tensor:
        """This micro-batch's share of the step loss: mean masked MSE over the step's target images
        plus prior_weight x mean MSE over its regularisation images."""
        latents = torch.stack([lt.sample() for lt, _, _ in part]) * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = noise_sched.add_noise(latents, noise, t)
        target = noise if noise_sched.config.prediction_type == "epsilon" else noise_sched.get_velocity(latents, noise, t)
        is_target = [kind == "target" for _, (kind, _), _ in part]
        with autocast:
            text, pooled = [], []
            prompts = [p for _, (kind, p), _ in part if kind == "target"]
            if prompts:
                h, pl = encode_text(prompts, grad=True)
                text.append(h)
                pooled.append(pl)
            for _, (kind, caption), _ in part:
                if kind == "reg":
                    if caption not in reg_text:
                        h, pl = encode_text([caption], grad=False)
                        reg_text[caption] = (h.detach(), pl.detach() if pl is not None else None)
                    text.append(reg_text[caption][0])
                    pooled.append(reg_text[caption][1])
            enc = torch.cat([x.to(text[0].dtype) for x in text])
            added = None
            if pooled[0] is not None:  # SDXL
                added = textcond.added_conditioning(pipe, torch.cat([x.to(enc.dtype) for x in pooled]), res)
            pred = unet(noisy.to(unet_dtype), t, enc, added_cond_kwargs=added).sample
        loss = pred.new_zeros((), dtype=torch.float32)
        k = sum(is_target)
        if k:
            mask = torch.stack([m for _, _, m in part[:k]])
            loss = loss + masked_mse_per_sample(pred[:k], target[:k], mask).sum() / n_target
        if len(part) > k:
            per = ((pred[k:].float() - target[k:].float()) ** 2).mean(dim=(1, 2, 3))
            loss = loss + cfg.prior_weight * per.sum() / n_reg
        return loss

    losses: list[float] = []

    def own_state() -> dict:
        """What differs between processes: each draws its own data, augmentations and noise."""
        return {
            "py_rng": rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "mps_rng": torch.mps.get_rng_state() if device.type == "mps" else None,
            "target_orders": [list(c.order) for c in target_cycles],
            "reg_orders": {i: list(c.order) for i, c in reg_cycles.items()},
        }

    def capture(done: int) -> dict | None:
        """Everything the remaining steps depend on: weights, optimizer, data order and the random states
        of every process. Collective under a multi-process launch; the state is returned on the main
        process only (weights and optimizer are the same in every process: gradients are all-reduced)."""
        ranks = _gather_objects(own_state(), processes)
        if rank != 0:
            return None
        return {
            "step": done,
            "weights": {n: params[n].detach().to("cpu", copy=True) for n in names},
            "rows": [r.detach().to("cpu", copy=True) for r in row_params],
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "losses": list(losses),
            "ranks": ranks,
        }

    def restore(state: dict) -> int:
        with torch.no_grad():
            for n in names:
                params[n].copy_(state["weights"][n])
            for r, v in zip(row_params, state["rows"]):
                r.copy_(v)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        own = state["ranks"][rank]
        version, internal, gauss = own["py_rng"]
        rng.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(own["torch_rng"])
        if own["cuda_rng"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(own["cuda_rng"], device)
        if own.get("mps_rng") is not None and device.type == "mps":
            torch.mps.set_rng_state(own["mps_rng"])
        for c, order in zip(target_cycles, own["target_orders"]):
            c.order = list(order)
        for i, order in own["reg_orders"].items():
            reg_cycles[int(i)].order = list(order)
        losses[:] = state["losses"]
        return int(state["step"])

    if resume and checkpointer is None:
        raise CdiffError("resume needs a checkpointer")
    start = restore(_load_everywhere(checkpointer, rank, processes)) if resume else 0
    if start >= cfg.steps:
        raise CdiffError(f"the checkpoint is at step {start}, and this run has only {cfg.steps} steps")

    hooks = [te_i.get_input_embeddings().register_forward_hook(r.hook) for te_i, _, r in rows_of]
    hooks += [mod.register_forward_hook(_detach_first_hook) for n, mod in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    t0 = time.perf_counter()
    try:
        with (StopSignals() if checkpointer is not None else nullcontext()) as stop, frozen_ops.saving_less(unet), \
                (offload.frozen_parts_offloaded(unet, [te_i for te_i, _, _ in rows_of], device) if cfg.offload else nullcontext()), \
                progress.task("training", cfg.steps) as bar:
            if start:
                bar.advance(start)
            for step in range(start, cfg.steps):
                targets = [draw_target(ci) for ci in balanced_slots(step, n_target, len(concepts))]
                regs = [draw_reg(reg_concepts[s]) for s in balanced_slots(step, n_reg, len(reg_concepts))] if n_reg else []
                # One sample per image: (latent, text source, mask or None). Targets first, then regs.
                samples = [(lt, ("target", caption), lt.mask) for lt, caption in targets]
                samples += [(lt, ("reg", caption), None) for lt, caption in regs]
                micro = cfg.micro_batch or len(samples)
                optimizer.zero_grad(set_to_none=True)
                value = 0.0
                # Micro-batches accumulate gradients: the same update as one big batch, less memory.
                for s in range(0, len(samples), micro):
                    part = samples[s : s + micro]
                    loss = step_loss(part, n_target, n_reg)
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    value += float(loss.detach())
                done = step + 1
                due = checkpointer is not None and rank == 0 and checkpointer.due(done, cfg.steps)
                if processes > 1:
                    # One all-reduce carries the gradients, the losses and the decisions to stop or save,
                    # so every process stops or saves after the same step (a signal may reach only one).
                    asked = stop is not None and stop.requested
                    total, stops, saves = _all_reduce_mean(trainable, processes, [value, asked, due])
                    value, due = total / processes, saves > 0
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                if not math.isfinite(value):
                    raise CdiffError(f"training diverged at step {done} (loss {value}); try a lower --lr")
                losses.append(value)
                bar.advance(1, loss=value)
                # Alone, a stop asked for at any time during this step is honoured right after it.
                stopping = stops > 0 if processes > 1 else stop is not None and stop.requested
                if stopping and done < cfg.steps:
                    saved = _save_on_main(checkpointer, capture(done), done, cfg.steps, progress, rank, processes)
                    raise StopRequested(done, cfg.steps, saved=saved)
                if due:
                    _save_on_main(checkpointer, capture(done), done, cfg.steps, progress, rank, processes)
                if sampler is not None and rank == 0 and sampler.due(done, cfg.steps):
                    bar.status(f"sampling at step {done}")
                    path = sampler(pipe, done, device, autocast)
                    progress.note(f"samples at step {done}: {path}")
    finally:
        for h in hooks:
            h.remove()
        unet.eval()
        if checkpointing:
            unet.disable_gradient_checkpointing()
        for n in names:
            params[n].requires_grad_(False)
        for m, home in homes.items():
            if m is not vae or device.type != "cpu":  # (on a CPU the VAE may have been freed: see above)
                m.to(home)

    # Write the learned rows into the table so the pipeline can be used right away.
    with torch.no_grad():
        for te_i, ids_i, r in rows_of if keep_pipe else ():
            table = te_i.get_input_embeddings().weight
            table[torch.tensor(ids_i, device=table.device)] = r.rows.detach().to(table.dtype)
    learned = [r.rows.detach().cpu().float().clone() for _, _, r in rows_of]
    delta = Delta(read_weights(unet, names), toks, learned[0], cfg.mode,
                  embeddings_2=learned[1] if len(learned) > 1 else None)
    sampling = sampler.seconds if sampler is not None else 0.0
    return TrainResult(delta, losses, time.perf_counter() - t0 - sampling, lr, processes, sampling)


def _try_save(checkpointer: Checkpointer, state: dict, step: int, steps: int, progress: Progress) -> bool:
    """Save a checkpoint; a failure (a full disk) is a warning, not the end of the run: the training
    itself is fine, and the previous checkpoint is intact."""
    try:
        checkpointer.save(state, step, steps)
        return True
    except Exception as e:  # OSError, or torch.save's RuntimeError on a really full disk
        progress.warn(f"could not save the checkpoint at step {step}: {reason(e)}; training goes on")
        return False


def _save_on_main(checkpointer, state, step: int, steps: int, progress: Progress, rank: int, processes: int) -> bool:
    """The main process writes the checkpoint; every process learns whether it was saved."""
    saved = _try_save(checkpointer, state, step, steps, progress) if rank == 0 else False
    if processes > 1:
        from accelerate.utils import broadcast_object_list

        saved = broadcast_object_list([saved])[0]
    return saved


def _load_everywhere(checkpointer: Checkpointer, rank: int, processes: int) -> dict:
    """The checkpoint, read (and checked against this run) by the main process and sent to the others,
    so that only the process holding the training lock touches the checkpoint folder, and a refusal
    stops every process with the same message."""
    if processes == 1:
        return checkpointer.load()
    from accelerate.utils import broadcast_object_list

    box: list = [None, None]  # [state, error message]
    if rank == 0:
        try:
            box[0] = checkpointer.load()
        except CdiffError as e:
            box[1] = str(e)
            broadcast_object_list(box)
            raise
    broadcast_object_list(box)
    if box[1] is not None:
        raise CdiffError(box[1])
    return box[0]


def _gather_objects(obj, processes: int) -> list:
    """`obj` of every process, in process order (a one-item list with one process)."""
    if processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def _all_reduce_mean(tensors: list[torch.Tensor], processes: int, extra: list[float] = ()) -> list[float]:
    """Average gradients over processes: one flat all-reduce, no DDP wrapper around the UNet. `extra`
    numbers ride along in the same all-reduce and come back summed over the processes."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in tensors]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([float(x) for x in extra], device=grads[0].device)])
    dist.all_reduce(flat)
    sums = flat[flat.numel() - len(extra):].tolist()
    flat /= processes
    offset = 0
    for p, g in zip(tensors, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n
    return sums


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


def base_waits_in_cpu_memory(cfg: TrainConfig, device: torch.device) -> bool:
    """--low-memory/--offload on a CUDA GPU: the base is loaded into CPU memory, and each phase
    (regularisation images, latent caching, training) brings to the GPU only what it runs. (Apple's
    GPU shares the CPU's memory: nothing to gain there.)"""
    return (cfg.low_memory or cfg.offload) and device.type == "cuda"


def low_memory_config(cfg: TrainConfig) -> TrainConfig:
    """--low-memory: gradient checkpointing and one image per forward/backward (gradients accumulate,
    so the update is the same as the full batch's), on top of half-precision frozen weights. On a GPU
    the base also waits in CPU memory, and each phase brings to the GPU only what it runs (see
    workflows). Fits SD 1.x at 512 px in about 3 GB by the estimate."""
    from dataclasses import replace

    return replace(cfg, gradient_checkpointing=True, micro_batch=1, low_memory=True,
                   precision="auto" if cfg.precision == "fp32" else cfg.precision)


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
