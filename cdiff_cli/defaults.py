"""Defaults and choices the command line needs before any heavy import (torch, diffusers).

Kept free of heavy imports so `cdiff --help`, `cdiff list` and shell completion start quickly; the
engine modules re-export what they use from here.
"""

from dataclasses import dataclass

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # the paper's CLIP for text/image alignment
PAPER_DINO = "facebook/dino-vits16"  # the paper's DINO for image alignment
DEFAULT_RIDGE = 1e-3  # relative ridge of the closed-form merge (see cdiff_cli.merging)
DEFAULT_COMPRESS_ENERGY = 0.99  # share of each k/v update's energy `cdiff compress` keeps (README: Compression)

# The layouts `cdiff export --format` writes, with what each holds: the CLI's choices and help, and
# `transfer.export_entry`, read this one table.
EXPORT_FORMATS = {
    "diffusers": "pytorch_custom_diffusion_weights.safetensors + <token>.safetensors",
    "reference": "delta.bin",
    "cdiff": "delta.safetensors + manifest.json",
    "lora": "NAME.safetensors (kohya-style LoRA of the k/v updates) + embeddings/*.safetensors, for ComfyUI and "
            "AUTOMATIC1111",
}

# Sampler names -> diffusers scheduler class names ("default" keeps the base's own scheduler).
SCHEDULERS = {
    "dpm": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "default": None,
}


@dataclass(frozen=True)
class TrainDefaults:
    """`cdiff train`'s defaults; the Python API's `train` reads the same (tests/test_api.py checks both)."""

    steps: int = 250  # the reference's for one concept
    batch_size: int = 8
    lr: float = 1e-5  # per image: the optimiser gets lr x batch size x processes
    scale_lr: bool = True
    mode: str = "kv"
    reg: str = "generated"
    num_reg: int = 200
    seed: int = 0
    aug: bool = True
    hflip: bool = True
    precision: str = "auto"
    aug_pool: int = 16
    device: str = "auto"
    sample_every: int = 0  # samples only at the end of training
    anchor: float = 0.0  # off: the paper's method (training.anchor; measured on nano in docs/nano-world.md)
    background_weight: float = 0.3  # of masked photos' backgrounds (NAME.mask.png); photos without masks: no effect


DEFAULT_GUIDANCE = 6.0  # classifier-free guidance for Stable Diffusion bases
WORLD_GUIDANCE = 3.0  # for a nano-world base, which follows its prompts best there (docs/nano-world.md)
# Training steps per concept in `cdiff demo` (and its CI test and benchmark): over five seeds 600 steps beat
# 300 and 1000 at lr 6e-4 (docs/nano-world.md, "Training steps").
DEMO_STEPS = 600


@dataclass(frozen=True)
class GenDefaults:
    """`cdiff gen`'s (and `merge`'s ridge) defaults; the Python API's `generate` and `merge` read the same."""

    n: int = 1
    steps: int = 25
    guidance: float | None = None  # None: the base's own (generation.base_guidance: 3 on nano, else 6)
    seed: int = 0
    scheduler: str = "dpm"
    batch_size: int = 4
    precision: str = "fp16"  # on a GPU; a CPU computes in fp32 unless bf16 is asked for
    device: str = "auto"
    ridge: float = DEFAULT_RIDGE


@dataclass(frozen=True)
class Limits:
    """Upper bounds of the size and count options: beyond them a run would be killed by the OOM killer or run
    for days instead of stopping with a message. Far above any real use."""

    steps: int = 1_000_000  # training steps
    batch_size: int = 256  # training images per step and process
    num_reg: int = 10_000
    resolution: int = 4096  # px, training and generation
    aug_pool: int = 1_000
    images: int = 10_000  # images per gen / eval call
    sample_steps: int = 1_000  # denoising steps
    gen_batch_size: int = 64
    guidance: float = 100.0
    seed: int = 2**32 - 1


TRAIN = TrainDefaults()
LIMITS = Limits()
GEN = GenDefaults()
