"""The Typer app and the error boundary every command runs inside."""

from __future__ import annotations

import functools
import os

import typer

from cdiff_cli.cli._term import term
from cdiff_cli.errors import CdiffError

app = typer.Typer(
    name="cdiff",
    help="Teach a text-to-image diffusion model new concepts with Custom Diffusion, and use them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def debug() -> bool:
    return os.environ.get("CDIFF_DEBUG", "") not in ("", "0")


def command(*args, **kwargs):
    """`@app.command` plus the error boundary: one clear line on stderr and an exit code, never a
    traceback (unless CDIFF_DEBUG=1)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            try:
                return fn(*a, **k)
            except (typer.Exit, typer.Abort):
                raise
            except CdiffError as e:
                if debug():
                    raise
                term.error(str(e))
                raise typer.Exit(e.exit_code) from None
            except KeyboardInterrupt:
                if debug():
                    raise
                term.error("interrupted: nothing was saved")
                raise typer.Exit(130) from None
            except Exception as e:  # an unexpected failure still gets one line (set CDIFF_DEBUG=1 for the traceback)
                if debug():
                    raise
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                term.error(f"{type(e).__name__}: {first} (set CDIFF_DEBUG=1 for details)")
                raise typer.Exit(1) from None

        return app.command(*args, **kwargs)(wrapper)

    return decorate
