"""The engine's exceptions: what went wrong, with fields saying what it concerns.

The engine never speaks in command-line flags. A message about an option (a `Message`) names it by a
placeholder, `{ridge}`, filled with the option's name in the Python API's words by default (`str(e)`:
"ridge must be a positive number"); the CLI renders the same message with its own flags (`e.render(flag)`:
"--ridge must be a positive number") and exits with the exception's `exit_code`. Warnings sent to a
`Progress` may be `Message`s too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

# How the Python API names an option whose command-line flag is a switch.
API_NAMES = {"force": "force=True", "resume": "resume=True"}


def api_name(option: str) -> str:
    return API_NAMES.get(option, option)


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's text (libraries' messages run over many lines), else
    its type's name: for one-line error messages."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def reason(e: BaseException) -> str:
    """Like `first_line`, but the system's own words for an OSError (disk full, permission denied)."""
    return e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)


def text_escaped(text: str) -> str:
    """Plain text as part of a `Message` template."""
    return text.replace("{", "{{").replace("}", "}}")


class Message:
    """Text that may name options: `Message("{ridge} must be positive, not {v}", "ridge", v=-1)`. The options
    are `{placeholders}` filled with their names when rendered; the other variable parts are `values`, so
    that text from the user is never read as a placeholder (`Message.plain` escapes text that has none).
    `str()` uses the API's names."""

    def __init__(self, template: str, *options: str, **values):
        self.template, self.options, self.values = template, options, values

    @classmethod
    def plain(cls, text: str) -> Message:
        return cls(text_escaped(text))

    def render(self, option_name: Callable[[str], str] = api_name) -> str:
        return self.template.format(**{o: option_name(o) for o in self.options}, **self.values)

    def add(self, more: str | Message) -> None:
        """Append plain text, or another message with its options and values (value names must differ)."""
        more = more if isinstance(more, Message) else Message.plain(more)
        self.template += more.template
        self.options += tuple(o for o in more.options if o not in self.options)
        self.values.update(more.values)

    def __str__(self) -> str:
        return self.render()


class CdiffError(Exception):
    """A problem the user can fix (bad input, missing file, mismatched base...). `message` is a string or a
    `Message` that names options; `name` and `path` say which concept or file it concerns, where one does.
    `str(e)` names options as the Python API does; `e.render(flag)` as the CLI does."""

    exit_code = 1  # the exit status of `cdiff` when a command ends with this error

    def __init__(self, message: str | Message = "", *, name: str | None = None, path: str | Path | None = None):
        self.message = message if isinstance(message, Message) else Message.plain(message)
        self.name, self.path = name, path
        super().__init__(self.message.render())

    @property
    def options(self) -> tuple[str, ...]:
        return self.message.options

    def render(self, option_name: Callable[[str], str] = api_name) -> str:
        return self.message.render(option_name)

    def add(self, more: str | Message) -> CdiffError:
        """Append `more` (plain text, or a `Message`) to the message; returns the exception."""
        self.message.add(more)
        self.args = (self.message.render(),)
        return self


def option_error(template: str, *options: str, **values) -> CdiffError:
    """A CdiffError that names options: `option_error("{ridge} must be positive, not {v}", "ridge", v=-1)`."""
    return CdiffError(Message(template, *options, **values))


def already_exists(name: str) -> CdiffError:
    return CdiffError(Message("concept {name} already exists (use {force} to replace it)", "force", name=repr(name)),
                      name=name)


class NotFoundError(CdiffError):
    """A named registry entry, token or file does not exist."""

    exit_code = 2


class TrainingStopped(CdiffError):
    """Training stopped by a stop request (Ctrl-C or SIGTERM under the CLI) after saving a checkpoint."""

    exit_code = 130


class BusyError(CdiffError):
    """Another cdiff process holds the lock of a concept (training it, writing or reading it)."""

    exit_code = 3
