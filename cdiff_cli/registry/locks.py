"""Per-name inter-process locks for the registry: shared (readers) and exclusive (writers).

A lock is `fcntl.flock` on `HOME/locks/NAME.lock`. The kernel drops a flock when its process dies, so
a crash or `kill -9` never leaves a stale lock and nothing ever has to be cleaned up by hand. The lock
files themselves are kept (deleting a lock file while another process may be opening it would let two
processes "hold" the same lock).

Writers are preferred: a second file, `NAME.gate`, is taken briefly by everyone before the lock
itself, and a writer keeps it while it waits for the readers inside to finish, so a steady stream of
readers cannot starve a writer.

Within one process the locks are reentrant (a table counts what the process holds; flock on a second
descriptor of the same file would conflict with the first):

- shared inside shared, shared inside exclusive, exclusive inside exclusive: granted at once;
- exclusive inside shared (an upgrade): refused with RuntimeError. flock converts a lock by dropping it
  and taking the new one, so another writer could slip in between and the caller's reads would no
  longer be protected; take the exclusive lock first instead.

Locks belong to the process, not to a thread. A forked child starts holding nothing (its copies of the
descriptors are closed without unlocking, which leaves the parent's locks in place).

The holder's pid and command are written into the lock file for the "busy" message only; they are never
used to decide anything. Where `fcntl` does not exist (Windows) `filelock.FileLock` is used instead, and
every lock is exclusive.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cdiff_cli.errors import BusyError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_POLL_MIN, _POLL_MAX = 0.005, 0.1


@dataclass
class _Held:
    shared: bool
    count: int
    fd: int | None = None  # fcntl backend
    filelock: object | None = None  # filelock backend


_table: dict[str, _Held] = {}
_table_guard = threading.Lock()


def _forget_in_child() -> None:
    for held in _table.values():
        if held.fd is not None:
            try:
                os.close(held.fd)  # no LOCK_UN: that would release the parent's lock too
            except OSError:
                pass
    _table.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def command_line() -> str:
    """A short description of this process for other processes' messages: `cdiff train`, `pytest`..."""
    argv = sys.argv or [""]
    prog = os.path.basename(argv[0]) or "python"
    if prog in ("__main__.py", "cdiff", "cdiff.exe") or prog.startswith("cdiff_cli"):
        prog = "cdiff"
    sub = next((a for a in argv[1:] if not a.startswith("-")), "")
    return f"{prog} {sub}".strip() if prog == "cdiff" else prog


def holder(path: str | Path) -> dict | None:
    """What the lock file says about its last holder, if that process is still alive (informational)."""
    if fcntl is None:
        return None  # the filelock backend writes no holder (and os.kill(pid, 0) would end a process on Windows)
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid == os.getpid() or not _alive(pid):
        return None
    return info if isinstance(info, dict) else None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def busy_error(path: str | Path, what: str, waited: float = 0.0) -> BusyError:
    info = holder(path)
    if info:
        doing = "writing" if info.get("mode") == "exclusive" else "reading"
        who = f"`{info.get('command') or 'cdiff'}` (pid {info['pid']}) is {doing} it"
    else:
        who = "another cdiff process is using it"
    after = f" (waited {waited:.0f} s)" if waited >= 1 else ""
    return BusyError(f"{what} is busy{after}: {who}; wait for it or stop it")


def _write_info(fd: int, shared: bool) -> None:
    info = {"pid": os.getpid(), "command": command_line(), "mode": "shared" if shared else "exclusive",
            "argv": " ".join(sys.argv)[:300], "since": time.time()}
    data = (json.dumps(info) + "\n").encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError:
        pass  # informational only


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _flock_until(fd: int, op: int, deadline: float) -> bool:
    """flock(op | LOCK_NB), polling until `deadline` (time.monotonic()); True once taken."""
    pause = _POLL_MIN
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        now = time.monotonic()
        if now >= deadline:
            return False
        time.sleep(min(pause, deadline - now))
        pause = min(pause * 2, _POLL_MAX)


def _acquire_fcntl(path: Path, shared: bool, wait: float, what: str) -> _Held:
    t0 = time.monotonic()
    deadline = t0 + max(wait, 0.0)
    gate_fd = _open(path.with_suffix(".gate"))
    try:
        if not _flock_until(gate_fd, fcntl.LOCK_EX, deadline):
            raise busy_error(path, what, time.monotonic() - t0)
        fd = _open(path)
        try:
            if not _flock_until(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, deadline):
                raise busy_error(path, what, time.monotonic() - t0)
        except BaseException:
            os.close(fd)
            raise
    finally:
        os.close(gate_fd)  # releases the gate
    _write_info(fd, shared)
    return _Held(shared=shared, count=1, fd=fd)


def _acquire_filelock(path: Path, wait: float, what: str) -> _Held:
    import filelock

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(path))
    t0 = time.monotonic()
    try:
        lock.acquire(timeout=max(wait, 0.0), poll_interval=0.05)
    except filelock.Timeout:
        raise busy_error(path, what, time.monotonic() - t0) from None
    return _Held(shared=False, count=1, filelock=lock)


def acquire(path: str | Path, *, shared: bool = False, wait: float = 0.0, what: str = "") -> None:
    """Take the lock at `path` (waiting up to `wait` seconds, 0 = fail at once) or raise BusyError.
    Every acquire is paired with one `release`; prefer the `lock` context manager."""
    path = Path(path)
    key = os.path.abspath(path)
    what = what or f"lock {path.name!r}"
    with _table_guard:
        held = _table.get(key)
        if held is not None:
            if held.shared and not shared:  # (the filelock backend never holds shared)
                raise RuntimeError(f"{what}: cannot upgrade a shared lock to an exclusive one in the same "
                                   "process; take the exclusive lock first")
            held.count += 1
            return
    try:
        new = _acquire_fcntl(path, shared, wait, what) if fcntl is not None else _acquire_filelock(path, wait, what)
    except OSError as e:
        # A read-only registry (a shared mount): nobody can write it, so a reader needs no lock.
        if not (shared and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM)):
            raise
        new = _Held(shared=True, count=1)
    with _table_guard:
        other = _table.get(key)
        if other is None:
            _table[key] = new
            return
        other.count += 1  # another thread of this process took it meanwhile (both shared): keep one
    if new.fd is not None:
        os.close(new.fd)  # the other descriptor still holds the shared lock


def release(path: str | Path) -> None:
    key = os.path.abspath(Path(path))
    with _table_guard:
        held = _table.get(key)
        if held is None:
            raise RuntimeError(f"releasing a lock this process does not hold: {path}")
        held.count -= 1
        if held.count > 0:
            return
        del _table[key]
    if held.fd is not None:
        if not held.shared:
            try:
                os.ftruncate(held.fd, 0)  # no stale holder info
            except OSError:
                pass
        fcntl.flock(held.fd, fcntl.LOCK_UN)
        os.close(held.fd)
    elif held.filelock is not None:
        held.filelock.release(force=True)


@contextmanager
def lock(path: str | Path, *, shared: bool = False, wait: float = 0.0, what: str = "") -> Iterator[None]:
    """Hold the lock at `path` for the `with` block (see the module doc; BusyError after `wait` s)."""
    acquire(path, shared=shared, wait=wait, what=what)
    try:
        yield
    finally:
        release(path)


def held(path: str | Path) -> str | None:
    """"shared" or "exclusive" if this process holds the lock at `path`, else None."""
    h = _table.get(os.path.abspath(Path(path)))
    return None if h is None else ("shared" if h.shared else "exclusive")
