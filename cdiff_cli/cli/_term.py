"""The one place that owns the terminal: messages and progress to stderr, data to stdout.

Commands never print ad hoc; they call `term.info/ok/warn/data/json/table` and `term.progress()`.
Rich degrades to plain text when stderr/stdout are not terminals (pipes, CI, CliRunner).
"""

from __future__ import annotations

import json as _json
import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from cdiff_cli.cli._flags import in_flags
from cdiff_cli.errors import Message
from cdiff_cli.progress import Progress, Task


class Terminal:
    def __init__(self):
        self.quiet = False

    # Consoles are created lazily so tests that swap sys.stdout/stderr (CliRunner) are honoured.
    @property
    def out(self) -> Console:
        # Piped output keeps whole rows (no wrapping at 80 columns) so scripts can cut/grep it.
        piped = not sys.stdout.isatty()
        return Console(file=sys.stdout, soft_wrap=True, width=240 if piped else None)

    @property
    def err(self) -> Console:
        return Console(file=sys.stderr, soft_wrap=True)

    def info(self, message: str) -> None:
        if not self.quiet:
            self.err.print(escape(message), highlight=False)

    def ok(self, message: str) -> None:
        if not self.quiet:
            self.err.print(f"[green]✓[/green] {escape(message)}", highlight=False)

    def warn(self, message: str | Message) -> None:
        self.err.print(f"[yellow]warning:[/yellow] {escape(in_flags(message))}", highlight=False)

    def error(self, message: str) -> None:
        self.err.print(f"[red]error:[/red] {escape(message)}", highlight=False)

    def data(self, text: str) -> None:
        sys.stdout.write(text + "\n")

    def json(self, obj) -> None:
        sys.stdout.write(_json.dumps(obj, indent=2, default=str) + "\n")

    def table(self, columns: list[str], rows: list[list[str]]) -> None:
        t = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
        for c in columns:
            t.add_column(c)
        for r in rows:
            t.add_row(*r)
        self.out.print(t)

    def progress(self) -> Progress:
        return _RichProgress(self) if not self.quiet else Progress()


term = Terminal()


class _RichTask(Task):
    def __init__(self, bar: RichProgress, task_id, fallback):
        self.bar, self.id, self.fallback = bar, task_id, fallback
        self.done, self.t0 = 0, time.perf_counter()

    def advance(self, n: int = 1, **fields) -> None:
        self.done += n
        extra = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        self.bar.update(self.id, advance=n, extra=extra)
        if self.fallback is not None:
            self.fallback(self.done, extra)

    def status(self, text: str) -> None:
        self.bar.update(self.id, extra=text)


class _RichProgress(Progress):
    """Rich bars on a terminal; a few plain lines (start, every 10 %, end) when not a TTY."""

    def __init__(self, terminal: Terminal):
        self.terminal = terminal

    @contextmanager
    def task(self, description: str, total: int):
        console = self.terminal.err
        columns = [
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[extra]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        ]
        live = console.is_terminal
        with RichProgress(*columns, console=console, transient=False, disable=not live) as bar:
            tid = bar.add_task(description, total=total, extra="", rate="")
            fallback = None
            if not live:
                step = max(1, -(-total // 10)) if total >= 20 else total
                t0 = time.perf_counter()

                def fallback(done, extra):
                    if done % step == 0 or done == total:
                        rate = done / max(time.perf_counter() - t0, 1e-9)
                        console.print(escape(f"{description}: {done}/{total} {extra} ({rate:.2f} it/s)"), highlight=False)

            task = _RichTask(bar, tid, fallback)
            orig = task.advance

            def advance(n: int = 1, **fields):
                orig(n, **fields)
                rate = task.done / max(time.perf_counter() - task.t0, 1e-9)
                bar.update(tid, rate=f"{rate:.2f} it/s")

            task.advance = advance
            yield task

    def note(self, message: str) -> None:
        self.terminal.info(message)

    def warn(self, message: str | Message) -> None:
        self.terminal.warn(message)
