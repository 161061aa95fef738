"""A kill at any moment of a registry write leaves no half entry: a process creating, replacing and
removing entries is SIGKILLed at random moments; every entry the registry then shows is whole (its delta
matches its manifest's hash), and `cdiff doctor --fix` clears what the killed write left."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from typer.testing import CliRunner

from cdiff_cli.cli import app
from cdiff_cli.registry import Registry

ROOT = Path(__file__).resolve().parents[1]

WRITER = """
import torch
from cdiff_cli.core.delta import Delta
from cdiff_cli.registry import Registry

reg = Registry()
g = torch.Generator().manual_seed(0)
w = {f"b{i}.attn2.to_k.weight": torch.randn(256, 768, generator=g) for i in range(8)}  # ~6 MB
print("ready", flush=True)
i = 0
while True:
    name = f"e{i % 3}"
    if i % 4 == 3 and reg.exists(name):
        reg.remove(name)
    else:
        reg.create(name, Delta(w, [f"<t{i % 3}>"], torch.full((1, 32), float(i))), {"i": i}, overwrite=True)
    i += 1
"""


def _assert_whole(reg: Registry) -> None:
    for e in reg.entries():
        digest = hashlib.sha256(e.delta_path.read_bytes()).hexdigest()
        assert e.manifest["content_hash"] == "sha256:" + digest, e.name
        delta = e.load_delta()
        assert delta.tokens == e.tokens and float(delta.embeddings[0, 0]) == e.manifest["i"]


def test_kills_during_registry_writes_leave_no_half_entry(home):
    env = {**os.environ, "CDIFF_HOME": str(home), "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    reg = Registry(home)
    for _ in range(8):
        p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        p.send_signal(signal.SIGKILL)
        p.wait()
        _assert_whole(reg)
    r = CliRunner().invoke(app, ["doctor", "--fix", "--json"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["doctor", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout) == [], r.output
    assert [p.name for p in reg.concepts.iterdir() if p.name.startswith(".")] == []
    _assert_whole(reg)
