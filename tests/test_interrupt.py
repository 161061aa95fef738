"""A real Ctrl-C (SIGINT) during training: exit 130, one line, no entry, no temporary folder."""

import os
import signal
import subprocess
import sys
import time

from cdiff_cli.registry import Registry

from .conftest import RES


def test_sigint_during_training_saves_nothing(home, sd1_base, cat_images):
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
    assert lines == ["error: interrupted: nothing was saved"], err
    assert "Traceback" not in err
    assert Registry(home).entries() == []
    concepts = home / "concepts"
    assert not concepts.exists() or list(concepts.iterdir()) == []
