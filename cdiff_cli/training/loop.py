"""The training loop, phase by phase (`Trainer`): prepare the new tokens and the trainable weights, cache
the latents, place the models, run the steps (checkpoints and samples between them), then give the
pipeline back and return the delta."""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext

import torch

from cdiff_cli.core import textcond
from cdiff_cli.core.delta import Delta
from cdiff_cli.core.layers import kv_names, read_weights, trainable_names
from cdiff_cli.core.tokens import add_tokens, initial_embedding
from cdiff_cli.errors import CdiffError, option_error, reason
from cdiff_cli.merging.captions import captions_for
from cdiff_cli.models import frozen_ops, offload
from cdiff_cli.progress import SILENT, Progress
from cdiff_cli.training.anchor import Anchor, anchor_gram
from cdiff_cli.training.checkpoint import Checkpointer, StopRequested
from cdiff_cli.training.config import (
    Concept,
    TrainConfig,
    TrainResult,
    balanced_slots,
    base_waits_in_cpu_memory,
    split_batch,
)
from cdiff_cli.training.distributed import all_reduce_mean, distributed, gather_objects, load_everywhere, save_on_main
from cdiff_cli.training.images import masked_mse_per_sample
from cdiff_cli.training.latents import (
    ENCODE_BATCH,
    ENCODE_BATCH_LOW_MEMORY,
    Encoder,
    Latent,
    LatentSource,
    PixelCache,
    cache_latents,
)


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


def _training_scheduler(pipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


class Trainer:
    """One run of `train` (see its docstring); `run()` goes through the phases in order."""

    def __init__(self, pipe, concepts: list[Concept], cfg: TrainConfig, *, device: torch.device | str = "cpu",
                 progress: Progress = SILENT, accelerator=None, checkpointer: Checkpointer | None = None,
                 keep_pipe: bool = True, sampler=None, stop=None, anchor_gram: torch.Tensor | None = None):
        # anchor_gram: the anchor's G (training.anchor.anchor_gram); None with cfg.anchor > 0: computed here over the
        # ordinary captions of the folder the pipeline was loaded from (merging.captions_for), uncached
        if not concepts:
            raise CdiffError("nothing to train: no concept given")
        cfg.check()
        self.tokens = [c.token for c in concepts]
        if len({t.lower() for t in self.tokens}) != len(self.tokens):
            raise CdiffError(f"each concept needs its own token, got {self.tokens}")
        self.pipe, self.concepts, self.cfg, self.progress = pipe, concepts, cfg, progress
        self.checkpointer, self.keep_pipe, self.sampler = checkpointer, keep_pipe, sampler
        # Anything with a `requested` flag (the CLI's `StopSignals`): when it is set, the run checkpoints
        # after the current step and raises StopRequested. Signal handlers are the caller's business.
        self.stop = stop if checkpointer is not None else None
        self.device = torch.device(device)
        self.rank = accelerator.process_index if distributed(accelerator) else 0
        self.processes = accelerator.num_processes if distributed(accelerator) else 1
        self.rng = random.Random(cfg.seed * 1009 + self.rank)  # each process draws its own data
        torch.manual_seed(cfg.seed * 1009 + self.rank)
        self.unet, self.vae = pipe.unet, pipe.vae
        self.noise_sched = _training_scheduler(pipe)
        self.factor = int(pipe.vae_scale_factor)
        self.res = cfg.resolution or int(self.unet.config.sample_size) * self.factor
        if self.res % self.factor:
            raise option_error("{resolution} must be a multiple of {factor}", "resolution", factor=self.factor)
        self.losses: list[float] = []
        self.anchor_gram, self.anchor = anchor_gram, None

    @property
    def text_encoders(self) -> list:
        return [te for te, _, _ in self.rows_of]

    # -- prepare ------------------------------------------------------------------------------------
    def _add_tokens(self) -> None:
        """New tokens: added to the tokenizer, initialised from their class word. SDXL: every token gets a
        row in each of its two text encoders."""
        self.rows_of = []  # (text encoder, ids, _TokenRows) per encoder
        for tok_i, te_i in textcond.encoders(self.pipe):
            init = torch.stack([initial_embedding(tok_i, te_i, c.class_word) for c in self.concepts])
            ids_i = add_tokens(tok_i, te_i, self.tokens, init)
            self.rows_of.append((te_i, ids_i, _TokenRows(ids_i, init).to(self.device)))

    def _open_trainables(self) -> None:
        """Freeze everything, then open exactly the trainable cross-attention parameters (kept fp32)."""
        for m in (self.unet, self.vae, *self.text_encoders):
            m.requires_grad_(False)
        self.names = trainable_names(self.unet, self.cfg.mode)
        # Only the trainable ones: a reference to a frozen parameter would keep it on the device under --offload.
        wanted = set(self.names)
        self.params = {n: p for n, p in self.unet.named_parameters() if n in wanted}
        for n in self.names:
            self.params[n].data = self.params[n].data.to(self.device, torch.float32)
            self.params[n].requires_grad_(True)
        self.row_params = [r.rows for _, _, r in self.rows_of]
        self.trainable = [self.params[n] for n in self.names] + self.row_params
        if self.cfg.anchor and kv_names(self.names):  # (textual inversion trains no k/v weight to anchor)
            G = self.anchor_gram if self.anchor_gram is not None else anchor_gram(
                self.pipe, list(captions_for(getattr(self.pipe, "name_or_path", None))),
                [c.class_word for c in self.concepts])
            self.anchor = Anchor(self.params, G)
        # The pipeline may wait in CPU memory (training.entry loads it there for --low-memory and --offload on a
        # GPU): each phase brings to the device what it runs, so the whole base is never there at once.
        self.homes = {m: next(m.parameters()).device for m in (self.unet, self.vae, *self.text_encoders)}

    # -- cache latents ------------------------------------------------------------------------------
    def _cache(self) -> None:
        """Target pools and every regularisation image (both flips), encoded once; then the VAE leaves the
        device, and (for a caller done with the pipeline) the token tables keep only the rows used."""
        cfg, device = self.cfg, self.device
        self.vae.to(device)
        batch = ENCODE_BATCH_LOW_MEMORY if base_waits_in_cpu_memory(cfg, device) else ENCODE_BATCH
        self.source = LatentSource(Encoder(self.vae, device, batch=batch), PixelCache(self.res), self.res, self.factor,
                                   device, cfg.aug, cfg.hflip, [], [], cfg.background_weight)
        pool_size = cfg.aug_pool if (cfg.aug or cfg.hflip) else 1
        if pool_size > 0:
            cache_latents(self.concepts, self.source, pool_size, self.rng, self.progress)
            if device.type != "cpu":
                self.vae.to("cpu")  # not needed any more: give its memory to the UNet's activations
            elif not self.keep_pipe and self.sampler is None:
                self.vae.to("meta")  # frees the weights; only its config (the latent scaling factor) is read below
        if not self.keep_pipe:
            extra = self.sampler.prompts + [""] if self.sampler else []
            textcond.keep_rows_for(self.pipe, [p for c in self.concepts for p in c.prompts()] + extra)

    # -- place the models, the optimizer, the data order -----------------------------------------
    def _place(self) -> None:
        cfg, device = self.cfg, self.device
        if not cfg.offload:  # (under --offload, offload.frozen_parts_offloaded places them)
            for m in (self.unet, *self.text_encoders):
                m.to(device)
        # --offload needs checkpointing: without it autograd would keep every layer's weights on the device.
        self.checkpointing = cfg.gradient_checkpointing or cfg.offload
        if self.checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()
        self.lr = cfg.effective_lr(self.processes)
        groups = [{"params": self.row_params, "weight_decay": 0.0}]
        if self.names:  # empty in the textual-inversion baseline mode
            groups.insert(0, {"params": [self.params[n] for n in self.names], "weight_decay": cfg.weight_decay})
        self.optimizer = torch.optim.AdamW(groups, lr=self.lr, **({"fused": True} if device.type == "cuda" else {}))
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
        self.n_target, self.n_reg = split_batch(cfg.batch_size, any(c.reg for c in self.concepts))
        self.target_cycles = [_Cycler(len(c.images), self.rng) for c in self.concepts]
        self.reg_concepts = [i for i, c in enumerate(self.concepts) if c.reg]
        self.reg_cycles = {i: _Cycler(len(self.concepts[i].reg), self.rng) for i in self.reg_concepts}
        self.reg_text: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.unet_dtype = self.unet.conv_in.weight.dtype

    # -- one step -----------------------------------------------------------------------------------
    def _encode_text(self, prompts: list[str], grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(k/v input features, SDXL's pooled output or None)."""
        with torch.set_grad_enabled(grad):
            hidden, pooled, _ = textcond.encode(self.pipe, prompts, self.device)
            return hidden, pooled

    def _draw_target(self, ci: int) -> tuple[Latent, str]:
        """A latent of the next target image of concept `ci`, and its caption under its augmentation."""
        ii = self.target_cycles[ci].next()
        caption = self.concepts[ci].target_caption(ii)
        lt = (self.rng.choice(self.source.pools[ci][ii]) if self.source.pools
              else self.source.fresh_target(self.concepts[ci].images[ii], self.rng))
        return lt, lt.prefix + caption

    def _draw_reg(self, ci: int) -> tuple[Latent, str]:
        j = self.reg_cycles[ci].next()
        caption = self.concepts[ci].reg_caption(j)
        if self.source.reg:
            return self.rng.choice(self.source.reg[ci][j]), caption
        return self.source.fresh_reg(self.concepts[ci].reg[j].path, self.rng), caption

    def _conditioning(self, part) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text features of a micro-batch (targets first, with gradients; regularisation captions cached)."""
        text, pooled = [], []
        prompts = [p for _, (kind, p), _ in part if kind == "target"]
        if prompts:
            h, pl = self._encode_text(prompts, grad=True)
            text.append(h)
            pooled.append(pl)
        for _, (kind, caption), _ in part:
            if kind == "reg":
                if caption not in self.reg_text:
                    h, pl = self._encode_text([caption], grad=False)
                    self.reg_text[caption] = (h.detach(), pl.detach() if pl is not None else None)
                text.append(self.reg_text[caption][0])
                pooled.append(self.reg_text[caption][1])
        enc = torch.cat([x.to(text[0].dtype) for x in text])
        return enc, (torch.cat([x.to(enc.dtype) for x in pooled]) if pooled[0] is not None else None)

    def _loss(self, part) -> torch.Tensor:
        """This micro-batch's share of the step loss: mean masked MSE over the step's target images
        plus prior_weight x mean MSE over its regularisation images."""
        device, sched = self.device, self.noise_sched
        latents = torch.stack([lt.sample() for lt, _, _ in part]) * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = sched.add_noise(latents, noise, t)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        with self.autocast:
            enc, pooled = self._conditioning(part)
            added = textcond.added_conditioning(self.pipe, pooled, self.res) if pooled is not None else None  # SDXL
            pred = self.unet(noisy.to(self.unet_dtype), t, enc, added_cond_kwargs=added).sample
        loss = pred.new_zeros((), dtype=torch.float32)
        k = sum(kind == "target" for _, (kind, _), _ in part)
        if k:
            mask = torch.stack([m for _, _, m in part[:k]])
            loss = loss + masked_mse_per_sample(pred[:k], target[:k], mask).sum() / self.n_target
        if len(part) > k:
            per = ((pred[k:].float() - target[k:].float()) ** 2).mean(dim=(1, 2, 3))
            loss = loss + self.cfg.prior_weight * per.sum() / self.n_reg
        return loss

    def _forward_backward(self, step: int) -> float:
        """Draw the step's batch and accumulate its gradients; returns its loss (this process's)."""
        targets = [self._draw_target(ci) for ci in balanced_slots(step, self.n_target, len(self.concepts))]
        regs = ([self._draw_reg(self.reg_concepts[s]) for s in balanced_slots(step, self.n_reg, len(self.reg_concepts))]
                if self.n_reg else [])
        # One sample per image: (latent, text source, mask or None). Targets first, then regs.
        samples = [(lt, ("target", caption), lt.mask) for lt, caption in targets]
        samples += [(lt, ("reg", caption), None) for lt, caption in regs]
        micro = self.cfg.micro_batch or len(samples)
        self.optimizer.zero_grad(set_to_none=True)
        value = 0.0
        # Micro-batches accumulate gradients: the same update as one big batch, less memory.
        for s in range(0, len(samples), micro):
            loss = self._loss(samples[s : s + micro])
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            value += float(loss.detach())
        if self.anchor is not None:  # not in the reported loss, which stays the diffusion loss
            pen = self.cfg.anchor * self.anchor.penalty(self.params)
            (self.scaler.scale(pen) if self.scaler is not None else pen).backward()
        return value

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    # -- checkpoints --------------------------------------------------------------------------------
    def _own_state(self) -> dict:
        """What differs between processes: each draws its own data, augmentations and noise."""
        device = self.device
        return {
            "py_rng": self.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "mps_rng": torch.mps.get_rng_state() if device.type == "mps" else None,
            "target_orders": [list(c.order) for c in self.target_cycles],
            "reg_orders": {i: list(c.order) for i, c in self.reg_cycles.items()},
        }

    def _capture(self, done: int) -> dict | None:
        """Everything the remaining steps depend on: weights, optimizer, data order and the random states
        of every process. Collective under a multi-process launch; the state is returned on the main
        process only (weights and optimizer are the same in every process: gradients are all-reduced)."""
        ranks = gather_objects(self._own_state(), self.processes)
        if self.rank != 0:
            return None
        return {
            "step": done,
            "weights": {n: self.params[n].detach().to("cpu", copy=True) for n in self.names},
            "rows": [r.detach().to("cpu", copy=True) for r in self.row_params],
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "losses": list(self.losses),
            "ranks": ranks,
        }

    def _restore(self, state: dict) -> int:
        with torch.no_grad():
            for n in self.names:
                self.params[n].copy_(state["weights"][n])
            for r, v in zip(self.row_params, state["rows"]):
                r.copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        own = state["ranks"][self.rank]
        version, internal, gauss = own["py_rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(own["torch_rng"])
        if own["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(own["cuda_rng"], self.device)
        if own.get("mps_rng") is not None and self.device.type == "mps":
            torch.mps.set_rng_state(own["mps_rng"])
        for c, order in zip(self.target_cycles, own["target_orders"]):
            c.order = list(order)
        for i, order in own["reg_orders"].items():
            self.reg_cycles[int(i)].order = list(order)
        self.losses[:] = state["losses"]
        return int(state["step"])

    def _save(self, done: int) -> bool:
        return save_on_main(self.checkpointer, self._capture(done), done, self.cfg.steps, self.progress, self.rank,
                            self.processes)

    # -- the steps ----------------------------------------------------------------------------------
    def _steps(self, start: int, stop, bar) -> None:
        cfg, processes = self.cfg, self.processes
        for step in range(start, cfg.steps):
            value = self._forward_backward(step)
            done = step + 1
            due = self.checkpointer is not None and self.rank == 0 and self.checkpointer.due(done, cfg.steps)
            if processes > 1:
                # One all-reduce carries the gradients, the losses and the decisions to stop or save,
                # so every process stops or saves after the same step (a signal may reach only one).
                asked = stop is not None and stop.requested
                total, stops, saves = all_reduce_mean(self.trainable, processes, [value, asked, due])
                value, due = total / processes, saves > 0
            self._optimizer_step()
            if not math.isfinite(value):
                raise option_error("training diverged at step {step} (loss {loss}); try a lower {lr}", "lr", step=done, loss=value)
            self.losses.append(value)
            bar.advance(1, loss=value)
            # Alone, a stop asked for at any time during this step is honoured right after it.
            stopping = stops > 0 if processes > 1 else stop is not None and stop.requested
            if stopping and done < cfg.steps:
                raise StopRequested(done, cfg.steps, saved=self._save(done))
            if due:
                self._save(done)
            if self.sampler is not None and self.rank == 0 and self.sampler.due(done, cfg.steps):
                self._sample(done, bar)

    def _sample(self, done: int, bar) -> None:
        """A grid of samples; if making it fails (out of memory, a full disk), the training goes on."""
        bar.status(f"sampling at step {done}")
        try:
            path = self.sampler(self.pipe, done, self.device, self.autocast)
        except Exception as e:
            self.progress.warn(f"could not make the samples at step {done}: {reason(e)}; training goes on")
            return
        self.progress.note(f"samples at step {done}: {path}")

    def _give_back(self) -> None:
        """The pipeline as it was: eval mode, no checkpointing, nothing trainable, each model at home."""
        self.unet.eval()
        if self.checkpointing:
            self.unet.disable_gradient_checkpointing()
        for n in self.names:
            self.params[n].requires_grad_(False)
        for m, home in self.homes.items():
            if m is not self.vae or self.device.type != "cpu":  # (on a CPU the VAE may have been freed: see _cache)
                m.to(home)

    def _result(self, seconds: float) -> TrainResult:
        # Write the learned rows into the table so the pipeline can be used right away.
        with torch.no_grad():
            for te_i, ids_i, r in self.rows_of if self.keep_pipe else ():
                table = te_i.get_input_embeddings().weight
                table[torch.tensor(ids_i, device=table.device)] = r.rows.detach().to(table.dtype)
        learned = [r.rows.detach().cpu().float().clone() for _, _, r in self.rows_of]
        delta = Delta(read_weights(self.unet, self.names), self.tokens, learned[0], self.cfg.mode,
                      embeddings_2=learned[1] if len(learned) > 1 else None)
        sampling = self.sampler.seconds if self.sampler is not None else 0.0
        return TrainResult(delta, self.losses, seconds - sampling, self.lr, self.processes, sampling)

    def run(self, resume: bool = False) -> TrainResult:
        if resume and self.checkpointer is None:
            raise CdiffError("resume needs a checkpointer")
        self._add_tokens()
        self._open_trainables()
        self._cache()
        self._place()
        start = self._restore(load_everywhere(self.checkpointer, self.rank, self.processes)) if resume else 0
        if start >= self.cfg.steps:
            raise CdiffError(f"the checkpoint is at step {start}, and this run has only {self.cfg.steps} steps")
        hooks = [te.get_input_embeddings().register_forward_hook(r.hook) for te, _, r in self.rows_of]
        hooks += [mod.register_forward_hook(_detach_first_hook) for n, mod in self.unet.named_modules()
                  if n.endswith(("attn2.to_k", "attn2.to_v"))]
        t0 = time.perf_counter()
        try:
            with frozen_ops.saving_less(self.unet), \
                    (offload.frozen_parts_offloaded(self.unet, self.text_encoders, self.device) if self.cfg.offload
                     else nullcontext()), \
                    self.progress.task("training", self.cfg.steps) as bar:
                if start:
                    bar.advance(start)
                self._steps(start, self.stop, bar)
        finally:
            for h in hooks:
                h.remove()
            self._give_back()
        return self._result(time.perf_counter() - t0)
