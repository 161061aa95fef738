"""Defaults and choices the command line needs before any heavy import (torch, diffusers).

Kept free of heavy imports so `cdiff --help`, `cdiff list` and shell completion start quickly; the
engine modules re-export what they use from here.
"""

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # the paper's CLIP for text/image alignment
PAPER_DINO = "facebook/dino-vits16"  # the paper's DINO for image alignment
DEFAULT_RIDGE = 1e-3  # relative ridge of the closed-form merge (see cdiff_cli.merge)
DEFAULT_COMPRESS_ENERGY = 0.99  # share of each k/v update's energy `cdiff compress` keeps (README: Compression)

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
