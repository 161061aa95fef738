"""`cdiff doctor`: finds each kind of damage a killed write or a hand edit leaves, repairs it with --fix
(quarantining, never deleting, user data), leaves healthy entries alone, and respects locks."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

from cdiff_cli.cli import app
from cdiff_cli.core.delta import Delta
from cdiff_cli.registry import Registry, doctor

ROOT = Path(__file__).resolve().parents[1]
BASE = {"ref": "tiny", "fingerprint": "f00d"}
runner = CliRunner()


def _delta(token: str, seed: int = 0) -> Delta:
    g = torch.Generator().manual_seed(seed)
    return Delta({"x.attn2.to_k.weight": torch.randn(16, 8, generator=g)}, [token], torch.randn(1, 8, generator=g))


def doctor_json(*args: str) -> tuple[int, list[dict]]:
    r = runner.invoke(app, ["doctor", "--json", *args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, json.loads(r.stdout)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _damaged_registry(home: Path) -> tuple[Registry, dict]:
    reg = Registry(home)
    c = reg.concepts
    for i, name in enumerate(["good", "flipped", "nodelta", "orig", "nofields", "garbage", "prev", "upd"]):
        reg.create(name, _delta(f"<t{i}>", i), {"classes": ["cat"], "base": BASE})
    good = _files(c / "good")
    prev = _files(c / "prev")
    # A killed write: its temp folder with half a delta.
    (c / ".tmp-ghost-abcd1234").mkdir()
    (c / ".tmp-ghost-abcd1234" / "delta.safetensors").write_bytes(good["delta.safetensors"][:100])
    # A killed `rm`.
    shutil.copytree(c / "good", c / ".rm-gone-x1y2z3w4" / "gone")
    # A folder with a delta but no manifest, and one whose manifest is not JSON.
    (c / "nomanifest").mkdir()
    (c / "nomanifest" / "delta.safetensors").write_bytes(good["delta.safetensors"])
    (c / "badjson").mkdir()
    (c / "badjson" / "delta.safetensors").write_bytes(good["delta.safetensors"])
    (c / "badjson" / "manifest.json").write_text("{\"name\": \"badjson\", ", encoding="utf-8")
    # One flipped byte in the tensor data.
    data = bytearray((c / "flipped" / "delta.safetensors").read_bytes())
    data[-5] ^= 0x01
    (c / "flipped" / "delta.safetensors").write_bytes(bytes(data))
    # The delta is gone.
    (c / "nodelta" / "delta.safetensors").unlink()
    # Renamed by hand: the manifest names another concept.
    (c / "orig").rename(c / "renamed")
    # A manifest without its content hash.
    m = json.loads((c / "nofields" / "manifest.json").read_text())
    del m["content_hash"]
    (c / "nofields" / "manifest.json").write_text(json.dumps(m))
    # A delta that is not safetensors at all, with a manifest whose hash matches it.
    junk = b"not a safetensors file" * 10
    (c / "garbage" / "delta.safetensors").write_bytes(junk)
    m = json.loads((c / "garbage" / "manifest.json").read_text())
    m["content_hash"] = "sha256:" + hashlib.sha256(junk).hexdigest()
    (c / "garbage" / "manifest.json").write_text(json.dumps(m))
    # A `--force` write killed between its two renames: the previous version is only in .old-, the new
    # one only in .tmp-.
    (c / ".old-prev-q1w2e3r4").mkdir()
    (c / "prev").rename(c / ".old-prev-q1w2e3r4" / "prev")
    shutil.copytree(c / "good", c / ".tmp-prev-a9s8d7f6")
    # A killed manifest update.
    (c / "upd" / "manifest.json.tmp").write_text("{\"na")
    # An unfinished training run.
    (home / "checkpoints" / "cp").mkdir(parents=True)
    (home / "checkpoints" / "cp" / "state.pt").write_bytes(b"\0" * 10)
    return reg, {"good": good, "prev": prev}


EXPECTED = {
    ("leftover", "ghost"), ("leftover", "gone"), ("orphan", "nomanifest"), ("bad-manifest", "badjson"),
    ("hash-mismatch", "flipped"), ("orphan", "nodelta"), ("name-mismatch", "renamed"),
    ("bad-manifest", "nofields"), ("bad-delta", "garbage"), ("interrupted", "prev"), ("leftover", "prev"),
    ("leftover", "upd"), ("checkpoint", "cp"),
}
QUARANTINED = {"nomanifest", "badjson", "flipped", "nodelta", "renamed", "nofields", "garbage"}


def test_doctor_finds_each_damage_and_fix_repairs_it(home):
    reg, before = _damaged_registry(home)
    code, found = doctor_json()
    assert code == 1
    assert {(f["kind"], f["name"]) for f in found} == EXPECTED
    assert len(found) == len(EXPECTED) and not any(f["fixed"] for f in found)
    assert all(f["fixable"] for f in found if f["kind"] != "checkpoint")
    cp = next(f for f in found if f["kind"] == "checkpoint")
    assert "--resume" in cp["detail"] and "--discard-checkpoints" in cp["detail"] and not cp["fixable"]
    # Checking changed nothing.
    assert (home / "concepts" / ".tmp-ghost-abcd1234").exists() and not (home / "quarantine").exists()

    code, fixed = doctor_json("--fix")
    assert code == 0, fixed  # the unfinished run's checkpoint is kept: it is not damage
    assert {(f["kind"], f["name"]) for f in fixed} == EXPECTED
    assert all(f["fixed"] for f in fixed if f["kind"] != "checkpoint")
    assert (home / "checkpoints" / "cp").exists()
    code, fixed = doctor_json("--fix", "--discard-checkpoints")
    assert code == 0 and [(f["kind"], f["fixed"]) for f in fixed] == [("checkpoint", True)]
    # Damaged entries were moved aside, not deleted; leftovers and the checkpoint are gone.
    q = sorted(p.name for p in (home / "quarantine").iterdir())
    assert {n.rsplit("-", 1)[0] for n in q} == QUARANTINED
    assert all(Path(f["moved_to"]).is_dir() for f in fixed if f["action"] == "quarantine")
    assert sorted(p.name for p in (home / "concepts").iterdir()) == ["good", "prev", "upd"]
    assert not (home / "checkpoints" / "cp").exists()
    # The healthy entry is untouched; the interrupted replacement was rolled back to the old version.
    assert _files(home / "concepts" / "good") == before["good"]
    assert _files(home / "concepts" / "prev") == before["prev"]
    assert sorted(_files(home / "concepts" / "upd")) == ["delta.safetensors", "manifest.json"]

    assert doctor_json() == (0, [])
    r = runner.invoke(app, ["doctor"])
    assert r.exit_code == 0 and "healthy (3 concepts" in r.stderr
    listing = json.loads(runner.invoke(app, ["list", "--json"]).stdout)
    assert [e["name"] for e in listing] == ["good", "prev", "upd"]
    assert reg.get("prev").load_delta().tokens == ["<t6>"]


def test_doctor_table_and_hint(home):
    reg = Registry(home)
    reg.create("good", _delta("<t0>"), {"base": BASE})
    (reg.concepts / "good" / "delta.safetensors").write_bytes(b"x")
    r = runner.invoke(app, ["doctor"])
    assert r.exit_code == 1
    assert "hash-mismatch" in r.stdout and "good" in r.stdout and "--fix: quarantine" in r.stdout
    assert "cdiff doctor --fix" in r.stderr


HOLDER = """
import sys, time
from cdiff_cli.registry import Registry
reg = Registry()
with (reg.hold("x") if sys.argv[1:] == ["train"] else reg.lock("x", wait=0)):
    print("ready", flush=True)
    time.sleep(60)
"""


def test_doctor_leaves_a_busy_name_alone(home, monkeypatch):
    reg = Registry(home)
    reg.create("x", _delta("<t0>"), {"base": BASE})
    tmp = reg.concepts / ".tmp-x-abcd1234"  # as if the holder were writing x right now
    tmp.mkdir()
    ckpt = home / "checkpoints" / "x"
    ckpt.mkdir(parents=True)
    monkeypatch.setattr(doctor, "LOCK_WAIT", 0.1)
    env = {**os.environ, "CDIFF_HOME": str(home)}
    p = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        code, found = doctor_json("--fix")
        assert code == 3
        assert [(f["kind"], f["name"], f["fixable"], f["fixed"]) for f in found] == [("busy", "x", False, False)]
        assert "is busy" in found[0]["detail"] and f"pid {p.pid}" in found[0]["detail"]
        assert tmp.exists() and ckpt.exists()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    # A training run holds the training lock: its checkpoint is busy, the rest of x is checked and fixed.
    p = subprocess.Popen([sys.executable, "-c", HOLDER, "train"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        code, found = doctor_json("--fix")
        assert code == 3 and {(f["kind"], f["fixed"]) for f in found} == {("leftover", True), ("busy", False)}
        assert "being trained" in next(f["detail"] for f in found if f["kind"] == "busy")
        assert not tmp.exists() and ckpt.exists()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    code, found = doctor_json("--fix", "--discard-checkpoints")
    assert code == 0 and {(f["kind"], f["fixed"]) for f in found} == {("checkpoint", True)}
    assert not ckpt.exists() and reg.exists("x")
