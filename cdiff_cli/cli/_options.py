"""Options shared by several commands (one definition, one help text)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from cdiff_cli.registry import Registry

Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
Base = Annotated[
    Optional[str],
    typer.Option(
        "--base",
        help="Base model: hub id, local diffusers folder or single-file .safetensors/.ckpt. "
        "Default: the concept's own base, else $CDIFF_BASE, else stable-diffusion-v1-5/stable-diffusion-v1-5.",
        show_default=False,
    ),
]
NewBase = Annotated[
    Optional[str],
    typer.Option(
        "--base",
        help="Base model: hub id, local diffusers folder or single-file .safetensors/.ckpt. "
        "Default: $CDIFF_BASE, else stable-diffusion-v1-5/stable-diffusion-v1-5.",
        show_default=False,
    ),
]
ImportBase = Annotated[
    Optional[str],
    typer.Option(
        "--base",
        help="Base model: hub id, local diffusers folder or single-file .safetensors/.ckpt. Default: the base "
        "a cdiff export records (cdiff_base.json), else $CDIFF_BASE, else stable-diffusion-v1-5/stable-diffusion-v1-5.",
        show_default=False,
    ),
]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, mps.")]
Force = Annotated[bool, typer.Option("--force", "-f", help="Replace an existing concept of the same name.")]


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


def registry() -> Registry:
    """The registry at $CDIFF_HOME (else the platform's user data folder)."""
    return Registry()
