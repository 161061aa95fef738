"""The `cdiff` command line: a thin Typer layer over the engine (`cdiff_cli.training.entry`, `merging.entries`, `generation`, `transfer`, `compression`, `evaluation`, `registry`)."""

from __future__ import annotations

import os

# Before transformers/diffusers are imported: their advice and loading bars are not for our users.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from typing import Annotated, Optional

import typer

from cdiff_cli import __version__

# Importing a command module registers its commands; this order is the order of `cdiff --help`.
# isort: off
from cdiff_cli.cli import train_cmd  # noqa: F401
from cdiff_cli.cli import merge_cmd  # noqa: F401
from cdiff_cli.cli import compress_cmd  # noqa: F401
from cdiff_cli.cli import gen_cmd  # noqa: F401
from cdiff_cli.cli import eval_cmd  # noqa: F401
from cdiff_cli.cli import transfer_cmds  # noqa: F401
from cdiff_cli.cli import registry_cmds  # noqa: F401
from cdiff_cli.cli import doctor_cmd  # noqa: F401
from cdiff_cli.cli import demo_cmd  # noqa: F401
# isort: on
from cdiff_cli.cli._app import app
from cdiff_cli.cli._term import term


def _version(value: bool):
    if value:
        term.data(f"cdiff {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages on stderr (errors still shown).")] = False,
):
    """Teach a text-to-image diffusion model new concepts (Custom Diffusion) and use them.

    Concepts live in a registry at $CDIFF_HOME (default: the platform's user data folder).
    """
    term.quiet = quiet


def main() -> None:
    app()
