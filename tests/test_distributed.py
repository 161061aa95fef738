"""Data-parallel training under `accelerate launch` with two CPU processes."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from cdiff_cli.registry import Registry

from .conftest import RES


@pytest.mark.skipif(shutil.which("accelerate") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "accelerate")),
                    reason="accelerate launcher not installed")
def test_two_cpu_processes_train_one_entry(home, sd1_base, cat_images):
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "cdiff_cli", "train", "dp", str(cat_images), "--class", "cat", "--base", str(sd1_base),
           "--steps", "4", "--batch-size", "2", "--num-reg", "2", "--resolution", str(RES), "--json"]
    env = {**os.environ, "CDIFF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout[r.stdout.index("{"):])  # only the main process reports
    assert out["processes"] == 2 and out["effective_batch_size"] == 4
    assert out["effective_lr"] == pytest.approx(1e-5 * 2 * 2)  # lr x batch x processes
    entries = Registry(home).entries()
    assert [e.name for e in entries] == ["dp"]
    assert entries[0].manifest["train"]["processes"] == 2
    assert entries[0].load_delta().embeddings.shape[0] == 1
