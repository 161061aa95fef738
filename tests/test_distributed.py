"""Data-parallel training under `accelerate launch` with two CPU processes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from cdiff_cli.registry import Registry

from .conftest import RES


def _launch(*args: str, home, timeout: int = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` with two CPU processes (run as a module: accelerate is a dependency, so this
    never depends on where its console script went)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    env = {**os.environ, "CDIFF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def test_two_cpu_processes_train_one_entry(home, sd1_base, cat_images):
    r = _launch("-m", "cdiff_cli", "train", "dp", str(cat_images), "--class", "cat", "--base", str(sd1_base),
                "--steps", "4", "--batch-size", "2", "--num-reg", "2", "--resolution", str(RES), "--json", home=home)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout[r.stdout.index("{"):])  # only the main process reports
    assert out["processes"] == 2 and out["effective_batch_size"] == 4
    assert out["effective_lr"] == pytest.approx(1e-5 * 2 * 2)  # lr x batch x processes
    entries = Registry(home).entries()
    assert [e.name for e in entries] == ["dp"]
    assert entries[0].manifest["train"]["processes"] == 2
    assert entries[0].load_delta().embeddings.shape[0] == 1


def test_two_processes_stop_together_and_resume_bit_identical(tmp_path, sd1_base, cat_images):
    worker = os.path.join(os.path.dirname(__file__), "dist_worker.py")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    r = _launch(worker, str(whole), str(sd1_base), str(cat_images), home=whole)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [line for line in r.stdout.splitlines() if "losses" in line]
    assert len(losses) == 2 and losses[0].split(": ", 1)[1] == losses[1].split(": ", 1)[1]  # the mean loss, everywhere

    # A Ctrl-C that reaches the second process only, during step 3: both stop after step 4, the
    # first all-reduce that carries the request, and the main process saves every process's state.
    r = _launch(worker, str(stopped), str(sd1_base), str(cat_images), "--stop-rank", "1", "--stop-at", "3", home=stopped)
    assert r.returncode != 0
    assert r.stderr.count("stopped at step 4/6; checkpoint saved") == 2, r.stderr[-3000:]
    run = json.loads((stopped / "checkpoints" / "cat" / "run.json").read_text())
    assert run["step"] == 4 and run["description"]["processes"] == 2
    assert Registry(stopped).entries() == []

    # One process cannot continue it: each process drew its own data.
    alone = subprocess.run([sys.executable, worker, str(stopped), str(sd1_base), str(cat_images), "--resume"],
                           capture_output=True, text=True, env={**os.environ, "CDIFF_HOME": str(stopped), "HF_HUB_OFFLINE": "1"})
    assert alone.returncode != 0 and "processes (2 then, 1 now) differs" in alone.stderr, alone.stderr[-3000:]

    r = _launch(worker, str(stopped), str(sd1_base), str(cat_images), "--resume", home=stopped)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = Registry(whole).entries()[0].load_delta(), Registry(stopped).entries()[0].load_delta()
    assert torch.equal(a.embeddings, b.embeddings)
    assert a.weights.keys() == b.weights.keys() and all(torch.equal(a.weights[n], b.weights[n]) for n in a.weights)
    assert not (stopped / "checkpoints" / "cat").exists()
