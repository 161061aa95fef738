"""The Typer app and the error boundary every command runs inside."""

from __future__ import annotations

import functools
import os
import shutil
from contextlib import contextmanager

import typer
from typer.core import TyperGroup

from cdiff_cli.cli._flags import flag
from cdiff_cli.cli._term import term
from cdiff_cli.errors import CdiffError, first_line

try:  # recent typer vendors click as typer._click; older versions use click itself
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException

    try:
        from click.exceptions import NoArgsIsHelpError
    except ImportError:  # click < 8.2 prints the help of a bare `cdiff` without raising
        NoArgsIsHelpError = ()




def usage_error_line(e: ClickException) -> str:
    """A click/typer usage error (bad option value, missing argument, unknown command) as one line."""
    message = " ".join(line.strip() for line in e.format_message().splitlines() if line.strip())
    message = message.replace(": Value error, ", ": ")  # typer's wording for a bad choice
    ctx = getattr(e, "ctx", None)
    if ctx is not None and ctx.command.get_help_option(ctx) is not None:
        message += f" (see '{ctx.command_path} {ctx.help_option_names[0]}')"
    return message


@contextmanager
def _one_line_usage_errors():
    try:
        yield
    except NoArgsIsHelpError:
        raise  # `cdiff` alone prints the help, as before
    except ClickException as e:
        term.error(usage_error_line(e))
        raise typer.Exit(e.exit_code) from None
    except typer.Abort:  # end of input or Ctrl-C at a confirmation prompt, which is left mid-line
        term.err.print()
        term.error("aborted: nothing was changed")
        raise typer.Exit(1) from None


class CdiffGroup(TyperGroup):
    """Usage errors become one `error: ...` line on stderr with their exit code (2), instead of the usage
    text in a Rich box. They are raised while parsing the global options (make_context) or a command's
    own (invoke); --help, --version, the help of a bare `cdiff` and typer.Exit pass through unchanged.
    `main()` and CliRunner both go through this group."""

    def make_context(self, *args, **kwargs):
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_usage_errors():
            return super().invoke(ctx)


app = typer.Typer(
    cls=CdiffGroup,
    name="cdiff",
    help="Teach a text-to-image diffusion model new concepts with Custom Diffusion, and use them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def debug() -> bool:
    return os.environ.get("CDIFF_DEBUG", "") not in ("", "0")


def _one_line(message: str) -> str:
    """A message's lines joined with ' | ': stderr gets exactly one line per error."""
    return " | ".join(line.strip() for line in message.strip().splitlines() if line.strip())


# Failures no check foresaw, said in words rather than as a bare exception name.
_WORDS = {
    "RecursionError": "the input is nested too deeply to read",
    "ZeroDivisionError": "a value in the input led to a division by zero",
    "MemoryError": "out of memory",
    "SameFileError": "the source and the destination are the same file",
    "KeyError": "a required field is missing",
    "OverflowError": "a number is too large",
}


def in_words(e: Exception) -> str:
    """One line for an unexpected exception: the system's words for an OSError (disk full, permission
    denied...), else what went wrong in words, with the exception's own text for reference."""
    if isinstance(e, OSError) and e.strerror and not isinstance(e, shutil.SameFileError):
        return e.strerror + (f": {e.filename}" if e.filename else "")
    name, text = type(e).__name__, first_line(e)
    detail = "" if text == name else text
    words = _WORDS.get(name)
    if words:
        return f"{words}{f' ({detail})' if detail else ''} (set CDIFF_DEBUG=1 for details)"
    return f"unexpected error: {name}{': ' + detail if detail else ''} (set CDIFF_DEBUG=1 for details)"


def command(*args, loads_models: bool = False, **kwargs):
    """`@app.command` plus the error boundary: one clear line on stderr and an exit code, never a
    traceback (unless CDIFF_DEBUG=1). `loads_models`: the command loads diffusers/transformers models, so
    their loading bars and advice are silenced first (process-wide, which only the CLI may decide)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            try:
                if loads_models:
                    from cdiff_cli.models.base import quiet_libraries

                    quiet_libraries()
                return fn(*a, **k)
            except (typer.Exit, typer.Abort):
                raise
            except CdiffError as e:
                if debug():
                    raise
                term.error(_one_line(e.render(flag)))
                raise typer.Exit(e.exit_code) from None
            except KeyboardInterrupt:
                if debug():
                    raise
                term.error("interrupted: nothing was saved")
                raise typer.Exit(130) from None
            except Exception as e:  # an unexpected failure still gets one line (set CDIFF_DEBUG=1 for the traceback)
                if debug():
                    raise
                term.error(in_words(e))
                raise typer.Exit(1) from None

        return app.command(*args, **kwargs)(wrapper)

    return decorate
