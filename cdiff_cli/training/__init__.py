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
backward) on the device at a time (`models/offload.py`).

Modules: `config` (what a run is asked), `images`, `latents`, `regularisation`, `loop` (the `Trainer`),
`checkpoint`, `distributed`, `samples`, and `entry` (`train_entry`: a run that becomes a registry entry).
"""

from __future__ import annotations

import torch

from cdiff_cli.progress import SILENT, Progress
from cdiff_cli.training.checkpoint import Checkpointer
from cdiff_cli.training.config import (
    Concept,
    TrainConfig,
    TrainResult,
    balanced_slots,
    base_waits_in_cpu_memory,
    config_dict,
    low_memory_config,
    split_batch,
)
from cdiff_cli.training.latents import ENCODE_BATCH, ENCODE_BATCH_LOW_MEMORY
from cdiff_cli.training.loop import Trainer

__all__ = ["ENCODE_BATCH", "ENCODE_BATCH_LOW_MEMORY", "Concept", "TrainConfig", "TrainResult", "Trainer", "balanced_slots",
           "base_waits_in_cpu_memory", "config_dict", "low_memory_config", "split_batch", "train"]


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
    stop=None,
    anchor_gram: torch.Tensor | None = None,
) -> TrainResult:
    """Train the concepts jointly into one delta. `pipe` is modified in place (weights and tokenizer).

    With a `checkpointer`, the run saves its state every `checkpointer.every` steps and when `stop` asks it
    to (then raising `StopRequested`): `stop` is anything with a `requested` flag, such as the
    `stopping.StopSignals()` the CLI enters so that Ctrl-C or SIGTERM stop at the end of a step (the
    engine installs no signal handler itself); `resume` continues from the saved state and
    ends with the same weights as an uninterrupted run. Under a multi-process launch every process passes
    the same `checkpointer`; only the main one reads or writes its folder.

    `keep_pipe=False` says the caller will not use `pipe` again, so what the steps do not read is freed:
    on a CPU, where it has nowhere to be moved, the VAE's weights (330 MB for SD 1.x in fp32) once the
    latents are cached, and everywhere the token-embedding rows that no prompt of the run uses (72 MB of
    SD 1.x's table in half precision; `textcond.keep_rows_for`). The delta is the same, but the pipeline
    can no longer encode other prompts. Measured on a CPU, the peak RSS falls by 100-150 MB for the VAE
    (fp32) and by 80 MB for the table (bf16).

    A `sampler` (`samples.TrainingSampler`) makes a grid of samples after the steps it asks for, on the main
    process, with the weights and tokens as they are then; the VAE and its prompts' rows are kept for it.

    With `cfg.anchor` > 0 the loss also holds the k/v outputs on ordinary text near the base (`training.anchor`);
    `anchor_gram` is its Gram matrix (`anchor.anchor_gram`); by default it is computed over the ordinary captions of
    the base `pipe` was loaded from (`merging.captions_for`: the world's on nano, else the shipped English ones)."""
    return Trainer(pipe, concepts, cfg, device=device, progress=progress, accelerator=accelerator,
                   checkpointer=checkpointer, keep_pipe=keep_pipe, sampler=sampler, stop=stop,
                   anchor_gram=anchor_gram).run(resume)
