"""Per-name registry locks: busy names fail clearly, crashes leave no lock, reentrancy, and readers
never see a partial entry while it is removed and re-created."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cdiff_cli.cli import app
from cdiff_cli.core.delta import Delta
from cdiff_cli.errors import BusyError, CdiffError, NotFoundError
from cdiff_cli.registry import Registry, locks
from cdiff_cli.registry import store as registry_mod

ROOT = Path(__file__).resolve().parents[1]

# A deterministic delta of ~1.5 MB: big enough that an unprotected read could catch a file half gone.
STRESS_DELTA = """
import torch
from cdiff_cli.core.delta import Delta

def stress_delta():
    g = torch.Generator().manual_seed(0)
    w = {f"b{i}.attn2.to_k.weight": torch.randn(128, 384, generator=g) for i in range(8)}
    return Delta(w, ["<x1>"], torch.randn(1, 32, generator=g))
"""


def _small_delta(seed: int = 0) -> Delta:
    g = torch.Generator().manual_seed(seed)
    return Delta({"x.attn2.to_k.weight": torch.randn(4, 3, generator=g)}, ["<x1>"], torch.randn(1, 3, generator=g))


def _spawn(code: str, home: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "CDIFF_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_ready(p: subprocess.Popen) -> None:
    line = p.stdout.readline()
    assert line.strip() == "ready", line + p.stderr.read()


HOLDER = """
import sys, time
from cdiff_cli.registry import locks
from cdiff_cli.registry import Registry
if len(sys.argv) > 1 and sys.argv[1] == "filelock":
    locks.fcntl = None  # the fallback backend (platforms without fcntl)
reg = Registry()
# argv[2] == "train": the training lock (Registry.hold); else the entry's lock, as a write holds it.
with (reg.hold("x") if sys.argv[2:] == ["train"] else reg.lock("x", wait=0)):
    print("ready", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("backend", ["fcntl", "filelock"])
def test_busy_name_fails_fast_and_a_killed_holder_leaves_no_lock(home, backend, monkeypatch):
    reg = Registry(home)
    reg.create("x", _small_delta(), {})
    p = _spawn(HOLDER, home, backend)
    try:
        _wait_ready(p)
        t0 = time.monotonic()
        with pytest.raises(BusyError) as info:
            with reg.lock("x", wait=0):
                pass
        assert time.monotonic() - t0 < 1.0
        assert info.value.exit_code == 3
        msg = str(info.value)
        assert msg.startswith("concept 'x' is busy") and "wait for it or stop it" in msg
        if backend == "fcntl":  # the holder wrote who it is into the lock file
            assert f"(pid {p.pid}) is writing it" in msg
        # Writers and readers wait up to their limit, then fail the same way.
        t0 = time.monotonic()
        with pytest.raises(BusyError):
            with reg.lock("x", shared=True, wait=0.3):
                pass
        assert 0.3 <= time.monotonic() - t0 < 2.0
        monkeypatch.setattr(registry_mod, "READ_WAIT", 0.2)
        monkeypatch.setattr(registry_mod, "WRITE_WAIT", 0.2)
        with pytest.raises(BusyError):
            reg.get("x").load_delta()
        with pytest.raises(BusyError):
            reg.remove("x")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    # The kernel dropped the lock with the process: free at once, nothing to clean up.
    t0 = time.monotonic()
    with reg.hold("x"):
        reg.remove("x")
    assert time.monotonic() - t0 < 0.5


def test_cli_reports_busy_with_exit_code_3(home, monkeypatch):
    reg = Registry(home)
    reg.create("x", _small_delta(), {})
    monkeypatch.setattr(registry_mod, "WRITE_WAIT", 0.2)
    p = _spawn(HOLDER, home, "fcntl")
    try:
        _wait_ready(p)
        r = CliRunner().invoke(app, ["rm", "x", "--yes"])
        assert r.exit_code == 3, r.output
        assert r.stderr.startswith("error: concept 'x' is busy") and f"pid {p.pid}" in r.stderr
        assert reg.exists("x")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()


def test_locks_are_reentrant_within_a_process(home):
    reg = Registry(home)
    with reg.hold("x"):
        reg.create("x", _small_delta(), {})  # does not wait on the run's own lock
        reg.update_manifest("x", note="inside")
        assert reg.get("x").load_delta().tokens == ["<x1>"]  # shared inside exclusive
        with reg.hold("x"):
            reg.create("x", _small_delta(1), {}, overwrite=True)
        assert locks.held(reg.train_lock_path("x")) == "exclusive"
        assert locks.held(reg.lock_path("x")) is None  # the entry's own lock is taken only while writing
    assert locks.held(reg.train_lock_path("x")) is None
    with reg.lock("x", shared=True):
        with reg.lock("x", shared=True):
            pass
        # An upgrade is refused (flock would drop the shared lock first): take the exclusive one first.
        with pytest.raises(RuntimeError, match="upgrade"):
            with reg.lock("x"):
                pass
        assert locks.held(reg.lock_path("x")) == "shared"
    # Released for real: another process can take it.
    p = _spawn("from cdiff_cli.registry import Registry\nwith Registry().hold('x'): print('ready', flush=True)\n", home)
    _wait_ready(p)
    assert p.wait() == 0


def test_fallback_backend_is_reentrant(home, monkeypatch):
    monkeypatch.setattr(locks, "fcntl", None)
    reg = Registry(home)
    with reg.hold("x"):
        reg.create("x", _small_delta(), {})
        with reg.lock("x", shared=True):
            with reg.lock("x"):  # everything is exclusive here, so this is no upgrade
                reg.remove("x")
    assert locks.held(reg.lock_path("x")) is None


def test_a_vanished_entry_reads_as_not_found(home):
    reg = Registry(home)
    e = reg.create("x", _small_delta(), {})
    listed = reg.get("x")
    reg.remove("x")
    with pytest.raises(NotFoundError, match="no concept named 'x'"):
        listed.load_delta()
    with pytest.raises(NotFoundError):
        with reg.reading("x"):
            pass
    # Replaced by different content since it was listed: refused, not mixed.
    reg.create("x", _small_delta(1), {})
    with pytest.raises(CdiffError, match="replaced"):
        e.load_delta()
    # Its own lock directory does not count as an entry.
    assert [x.name for x in reg.entries()] == ["x"]


READER = STRESS_DELTA + """
import hashlib, json, os, sys, time
from cdiff_cli.errors import NotFoundError
from cdiff_cli.registry import Registry

want = stress_delta()
reg = Registry()
stop = sys.argv[1]
ok = missing = 0
print("ready", flush=True)
while not os.path.exists(stop):
    try:
        with reg.reading("x") as e:  # manifest and delta of one version, under the shared lock
            d = e.load_delta()
        assert d.tokens == want.tokens and torch.equal(d.embeddings, want.embeddings)
        assert d.weights.keys() == want.weights.keys()
        assert all(torch.equal(d.weights[k], v) for k, v in want.weights.items())
        with reg.reading("x") as e:  # the bytes on disk are the ones the manifest describes
            data = e.delta_path.read_bytes()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == e.manifest["content_hash"]
        ok += 1
    except NotFoundError:
        missing += 1
print(json.dumps({"ok": ok, "missing": missing}), flush=True)
"""


def test_reader_sees_a_whole_entry_or_none_while_it_is_removed_and_recreated(home, tmp_path):
    scope: dict = {}
    exec(STRESS_DELTA, scope)
    delta = scope["stress_delta"]()
    reg = Registry(home)
    reg.create("x", delta, {})
    stop = tmp_path / "stop"
    p = _spawn(READER, home, str(stop))
    try:
        _wait_ready(p)
        cycles, t_end = 0, time.monotonic() + 3.0
        while time.monotonic() < t_end:
            reg.remove("x")
            time.sleep(0.002)  # let the reader find it missing now and then
            reg.create("x", delta, {})
            cycles += 1
    finally:
        stop.touch()
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["ok"] > 0 and cycles > 5, (seen, cycles)


def test_training_lock_is_separate_from_the_entry_lock(home):
    """A run training x (a `--force` retrain) fails a second run at once, but `gen` can still read x."""
    reg = Registry(home)
    reg.create("x", _small_delta(), {})
    p = _spawn(HOLDER, home, "fcntl", "train")
    try:
        _wait_ready(p)
        t0 = time.monotonic()
        with pytest.raises(BusyError, match=f"pid {p.pid}"):
            with reg.hold("x"):
                pass
        assert time.monotonic() - t0 < 1.0
        assert reg.get("x").load_delta().tokens == ["<x1>"]  # readers are not blocked by a training run
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()


def test_training_locks_cannot_collide_with_entry_locks(home):
    reg = Registry(home)
    assert reg.train_lock_path("x") != reg.lock_path("x.train")


def test_a_read_only_registry_can_still_be_read(home, monkeypatch):
    """No lock file can be created there, and nobody can write it either: readers go on unlocked."""
    import errno

    reg = Registry(home)
    reg.create("x", _small_delta(), {})

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(locks, "_open", read_only)
    assert reg.get("x").load_delta().tokens == ["<x1>"]
    with pytest.raises(OSError):
        reg.remove("x")  # a writer still fails (the CLI shows it as one line)
