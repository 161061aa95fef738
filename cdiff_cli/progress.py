"""A minimal progress interface the engine reports to; the CLI renders it with Rich."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cdiff_cli.errors import Message


class Task:
    def advance(self, n: int = 1, **fields) -> None:  # fields: loss=..., etc.
        pass

    def status(self, text: str) -> None:
        """What the task is doing between two advances ("sampling"), shown until the next advance."""


class Progress:
    """No-op progress: library callers get silence unless they pass their own."""

    @contextmanager
    def task(self, description: str, total: int):
        yield Task()

    def note(self, message: str) -> None:
        pass

    def warn(self, message: str | Message) -> None:
        """Something the user should know (a `Message` where it names options; `str()` gives its text)."""


SILENT = Progress()
