"""A real Ctrl-C (SIGINT) during training: exit 130, one line, no entry, no temporary folder, and a
checkpoint to resume from (see test_resume.py for the resume itself)."""

import json
import os
import signal
import subprocess
import sys
import time

from cdiff_cli.registry import Registry

from .conftest import RES


def test_sigint_during_training_leaves_a_checkpoint_and_no_entry(home, sd1_base, cat_images):
    env = {**os.environ, "CDIFF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cdiff_cli", "train", "x", str(cat_images), "--class", "cat", "--base", str(sd1_base),
           "--steps", "100000", "--batch-size", "2", "--resolution", str(RES), "--reg", "none", "--aug-pool", "2"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(10)  # base loaded, latents cached, training under way (100,000 steps never finish)
    assert p.poll() is None, p.stderr.read()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "checkpoint saved: run the same command with --resume" in lines[0], err
    assert "Traceback" not in err
    assert Registry(home).entries() == []
    concepts = home / "concepts"
    assert not concepts.exists() or list(concepts.iterdir()) == []
    run = json.loads((home / "checkpoints" / "x" / "run.json").read_text())
    assert run["steps"] == 100000 and 1 <= run["step"] < 100000
    assert [p.name for p in (home / "checkpoints").iterdir()] == ["x"]  # no temporary folder either
