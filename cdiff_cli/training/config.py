"""What a training run is asked to do: its concepts, its settings and what it returns."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch

from cdiff_cli.core.delta import Delta
from cdiff_cli.core.prompts import class_prompt, instance_prompt
from cdiff_cli.defaults import TRAIN
from cdiff_cli.errors import CdiffError, option_error
from cdiff_cli.training.images import FAR_PREFIXES, NEAR_PREFIXES, ImageItem

DEFAULT_BACKGROUND_WEIGHT = TRAIN.background_weight


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
    # Weight of the anchor on ordinary text (0: off, the paper's method): a penalty on how far the k/v outputs on the
    # base's ordinary captions and the concepts' class prompts move, relative to their size (`training.anchor`).
    anchor: float = 0.0
    # Loss weight of the background of photos that have a mask (NAME.mask.png beside them; 1: masks ignored). The
    # concept's pixels weigh 1. On nano (six seeds) 0.3 and 0.1 kept the photos' backgrounds out of the token.
    background_weight: float = DEFAULT_BACKGROUND_WEIGHT
    weight_decay: float = 1e-2
    gradient_checkpointing: bool = False
    aug_pool: int = 16  # augmented variants encoded once per target image; 0 = encode fresh draws every step
    micro_batch: int = 0  # images per forward/backward (gradients accumulate); 0 = the whole batch at once
    low_memory: bool = False  # recorded for the manifest; see `low_memory_config`
    offload: bool = False  # frozen UNet and text-encoder weights in CPU memory, one layer on the device at a time (with checkpointing)

    def effective_lr(self, processes: int = 1) -> float:
        return self.lr * self.batch_size * processes if self.scale_lr else self.lr

    def check(self) -> None:
        """Refuse settings no run can use, before an image is read or a model loaded (as EvalSettings.check)."""
        from cdiff_cli.core.layers import BASELINE_MODES, MODES

        if self.steps < 1 or self.batch_size < 1 or not (math.isfinite(self.lr) and self.lr > 0):
            raise option_error("{steps}, {batch_size} and {lr} must be positive (and {lr} a finite number)", "steps",
                               "batch_size", "lr")
        if self.mode not in MODES + BASELINE_MODES:
            raise option_error("{mode} must be one of {modes}, not {value}", "mode", modes=", ".join(MODES + BASELINE_MODES),
                               value=repr(self.mode))
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise option_error("{precision} must be auto, fp32, fp16 or bf16, not {value}", "precision",
                               value=repr(self.precision))
        if not (math.isfinite(self.background_weight) and 0.0 <= self.background_weight <= 1.0):
            raise option_error("{background_weight} must be between 0 and 1, not {value}", "background_weight",
                               value=self.background_weight)
        if not (math.isfinite(self.anchor) and self.anchor >= 0):
            raise option_error("{anchor} must be 0 or a positive number, not {value}", "anchor", value=self.anchor)
        if self.micro_batch < 0 or not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise CdiffError("micro_batch and weight_decay must be 0 or more")


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


def base_waits_in_cpu_memory(cfg: TrainConfig, device: torch.device) -> bool:
    """--low-memory/--offload on a CUDA GPU: the base is loaded into CPU memory, and each phase
    (regularisation images, latent caching, training) brings to the GPU only what it runs. (Apple's
    GPU shares the CPU's memory: nothing to gain there.)"""
    return (cfg.low_memory or cfg.offload) and device.type == "cuda"


def low_memory_config(cfg: TrainConfig) -> TrainConfig:
    """--low-memory: gradient checkpointing and one image per forward/backward (gradients accumulate,
    so the update is the same as the full batch's), on top of half-precision frozen weights. On a GPU
    the base also waits in CPU memory, and each phase brings to the GPU only what it runs (see
    training.entry). Fits SD 1.x at 512 px in about 3 GB by the estimate."""
    return replace(cfg, gradient_checkpointing=True, micro_batch=1, low_memory=True,
                   precision="auto" if cfg.precision == "fp32" else cfg.precision)


def config_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    if not d["anchor"]:  # runs without the anchor describe themselves as before it existed (their checkpoints resume)
        del d["anchor"]
    if d["background_weight"] == DEFAULT_BACKGROUND_WEIGHT:  # likewise; whether photos had masks is in the run's images
        del d["background_weight"]
    return d
