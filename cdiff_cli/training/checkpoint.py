"""Resumable training: the state of an unfinished run, saved atomically and restored exactly.

A checkpoint folder (`HOME/checkpoints/NAME/`) holds `state.pt` (the trainable tensors, the optimizer
and every random-number state, written with `torch.save` and read back with `weights_only=True`) and
`run.json` (what run it belongs to, and how far it got). Resuming restores all of it, so the resumed
run ends with the same weights as one that was never interrupted.

A stop request (`cdiff_cli.stopping.StopSignals`, entered by the CLI) is honoured at the end of the
current step: the weights are never saved half-updated.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cdiff_cli.errors import CdiffError, NotFoundError, option_error

STATE_FILE = "state.pt"
RUN_FILE = "run.json"
DEFAULT_SECONDS = 300.0  # by default a checkpoint every 5 minutes of training, whatever a step costs
# (100 steps are 10 minutes of SD 1.x on a CPU but 15 s on an H100: a step count fits neither)


def run_id(description: dict) -> str:
    """A short id of everything that determines a run's result (settings, images, base, tokens)."""
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def first_difference(a, b, prefix: str = "") -> str | None:
    """The first place (a dotted path, list items by index) where two run descriptions differ, with both
    values shortened, for a one-line error message."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            inner = first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if inner:
                return inner
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            inner = first_difference(x, y, f"{prefix}{i}.")
            if inner:
                return inner
        return None
    if a == b:
        return None

    def short(v) -> str:
        text = repr(v)
        return text if len(text) <= 40 else text[:37] + "..."

    return f"{prefix.rstrip('.')} ({short(a)} then, {short(b)} now)"


@dataclass
class Checkpointer:
    """Where and how often a run saves its state: every `every` steps, or when `every` is None every
    `seconds` of training; `every` = 0: only when stopped by a signal."""

    folder: Path
    description: dict  # the run's settings and inputs (see `run_id`); JSON-serialisable
    every: int | None = None
    seconds: float = DEFAULT_SECONDS
    clock: Callable[[], float] = time.monotonic
    _last: float | None = None

    def describe(self) -> str:
        if self.every is None:
            return f"every {self.seconds / 60:g} minutes"
        return f"every {self.every} steps" if self.every else "only when training is stopped"

    @property
    def exists(self) -> bool:
        """A complete checkpoint is there (call `recover` first, under the training lock, to finish what a
        killed save left undone)."""
        return (self.folder / STATE_FILE).is_file() and (self.folder / RUN_FILE).is_file()

    def info(self) -> dict:
        try:
            return json.loads((self.folder / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise option_error("the checkpoint in {folder} is damaged ({why}); start over with {force}", "force", folder=self.folder,
                               why=e) from e

    def due(self, step: int, steps: int) -> bool:
        """Save after `step` (1-based count of finished steps)? Never after the last: the entry follows.
        The time-based schedule counts from the first step it is asked about (or the last save)."""
        if step >= steps:
            return False
        if self.every is not None:
            return self.every > 0 and step % self.every == 0
        now = self.clock()
        if self._last is None:
            self._last = now
        return now - self._last >= self.seconds

    def save(self, state: dict, step: int, steps: int) -> None:
        """Write state.pt and run.json into a temporary folder, then swap it in: a kill at any moment
        leaves the previous checkpoint or the new one, never a mix."""
        parent = self.folder.parent
        parent.mkdir(parents=True, exist_ok=True)
        recover(self.folder)  # also clears what a killed save left (the caller holds the training lock)
        tmp = parent / f".tmp-{self.folder.name}-{os.getpid()}"
        tmp.mkdir()
        try:
            torch.save(state, tmp / STATE_FILE)
            run = {
                "run_id": run_id(self.description),
                "step": step,
                "steps": steps,
                "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "description": self.description,
            }
            (tmp / RUN_FILE).write_text(json.dumps(run, indent=2, default=str) + "\n", encoding="utf-8")
            old = parent / f".old-{self.folder.name}-{os.getpid()}"
            if self.folder.exists():
                os.replace(self.folder, old)
            os.replace(tmp, self.folder)
            shutil.rmtree(old, ignore_errors=True)
            self._last = self.clock()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def load(self) -> dict:
        """The saved state, after checking it belongs to this very run."""
        recover(self.folder)
        if not self.exists:
            raise NotFoundError(f"no checkpoint to resume in {self.folder}")
        info = self.info()
        if info.get("run_id") != run_id(self.description):
            diff = first_difference(info.get("description", {}), json.loads(json.dumps(self.description, default=str)))
            raise option_error("the checkpoint in {folder} is from a different run{diff}; resume with the same command, "
                               "or start over with {force}", "force", folder=self.folder,
                               diff=f": {diff} differs" if diff else "")
        try:
            return torch.load(self.folder / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or foreign file
            raise CdiffError(f"cannot read the checkpoint {self.folder / STATE_FILE}: {e}") from e

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# `Checkpointer.save`'s temporary folders: `.tmp-NAME-<pid>` and `.old-NAME-<pid>`.
LEFTOVER_RE = re.compile(r"\.(?:tmp|old)-(.+)-\d+")


def leftovers(folder: Path) -> list[Path]:
    """Folders a killed `Checkpointer.save` of `folder` left beside it, newest first. Matched exactly:
    `.tmp-cat-1-<pid>` belongs to `cat-1`, not to `cat`."""
    if not folder.parent.is_dir():
        return []
    found = []
    for p in folder.parent.iterdir():
        m = LEFTOVER_RE.fullmatch(p.name)
        if m and m.group(1) == folder.name:
            try:
                found.append((p.stat().st_mtime, p))
            except FileNotFoundError:  # renamed by a save meanwhile
                pass
    return [p for _, p in sorted(found, key=lambda x: x[0], reverse=True)]


def recover(folder: Path) -> None:
    """Finish what a save killed between its two renames left undone: if the checkpoint folder is gone,
    its previous version (the newest complete `.old-` folder) comes back; half-written `.tmp-` folders
    and superseded `.old-` ones are deleted. Call it only while holding the run's training lock."""
    for p in leftovers(folder):
        complete = (p / STATE_FILE).is_file() and (p / RUN_FILE).is_file()
        if p.name.startswith(".old-") and complete and not folder.exists():
            os.replace(p, folder)
        else:
            shutil.rmtree(p, ignore_errors=True)


class StopRequested(Exception):
    """Raised by the training loop after it has checkpointed in answer to a stop request."""

    def __init__(self, step: int, steps: int, saved: bool):
        super().__init__(f"stopped at step {step}/{steps}")
        self.step, self.steps, self.saved = step, steps, saved


