"""Interrupted training resumes exactly: the resumed run ends with the same weights, bit for bit, as a run
that was never interrupted (same seed), whether it was stopped by a signal or killed outright."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from cdiff_cli.errors import CdiffError, NotFoundError, TrainingStopped
from cdiff_cli.progress import Progress
from cdiff_cli.registry import Registry
from cdiff_cli.stopping import StopSignals
from cdiff_cli.training import TrainConfig
from cdiff_cli.training.entry import ConceptSpec, RegOptions, train_entry

from .conftest import RES
from .dist_worker import SignalAt


def _assert_same_delta(a, b):
    assert a.tokens == b.tokens and a.weights.keys() == b.weights.keys()
    assert torch.equal(a.embeddings, b.embeddings)
    for n in a.weights:
        assert torch.equal(a.weights[n], b.weights[n]), n


def _train(registry, folder, base, *, progress=None, **kw):
    cfg = TrainConfig(steps=7, batch_size=4, lr=1e-3, resolution=RES, aug_pool=3, precision="fp32")
    args = dict(base=str(base), reg=kw.pop("reg_opts", RegOptions("none", None, 0)), device="cpu",
                checkpoint_every=kw.pop("every", 0))
    if progress is not None:
        args["progress"] = progress
    with StopSignals() as stop:  # as `cdiff train` does: a SIGINT asks the run to stop
        return train_entry(registry, "mycat", [ConceptSpec("<mycat>", "cat", folder)], cfg, stop=stop, **args, **kw)


def test_ctrl_c_checkpoints_and_resume_is_bit_identical(tmp_path, sd1_base, cat_images):
    whole, _ = _train(Registry(tmp_path / "a"), cat_images, sd1_base)
    reg = Registry(tmp_path / "b")
    with pytest.raises(TrainingStopped, match=r"stopped at step 3/7; checkpoint saved"):
        _train(reg, cat_images, sd1_base, progress=SignalAt(3))
    assert reg.entries() == []
    assert json.loads((reg.home / "checkpoints" / "mycat" / "run.json").read_text())["step"] == 3
    # Without --resume the unfinished run is not silently thrown away.
    with pytest.raises(CdiffError, match=r"unfinished training \(step 3/7\): add --resume"):
        _train(reg, cat_images, sd1_base)
    resumed, _ = _train(reg, cat_images, sd1_base, resume=True)
    _assert_same_delta(whole.load_delta(), resumed.load_delta())
    assert not (reg.home / "checkpoints" / "mycat").exists()  # cleared once the entry is written


def test_resume_refuses_another_run_and_a_missing_checkpoint(tmp_path, sd1_base, cat_images):
    reg = Registry(tmp_path / "h")
    with pytest.raises(NotFoundError, match="nothing to resume"):
        _train(reg, cat_images, sd1_base, resume=True)
    with pytest.raises(TrainingStopped):
        _train(reg, cat_images, sd1_base, progress=SignalAt(2))
    Image.new("RGB", (80, 64), (9, 9, 9)).save(cat_images / "img0.png")  # the images changed
    with pytest.raises(CdiffError, match=r"different run: concepts.0.images.img0.png \("):
        _train(reg, cat_images, sd1_base, resume=True)
    assert reg.entries() == []


def test_resume_refuses_changed_regularisation_images(tmp_path, sd1_base, cat_images, chair_images):
    reg = Registry(tmp_path / "h")
    real = RegOptions("dir", chair_images, 3)
    with pytest.raises(TrainingStopped):
        _train(reg, cat_images, sd1_base, progress=SignalAt(2), reg_opts=real)
    Image.new("RGB", (64, 90), (9, 9, 9)).save(chair_images / "img0.png")  # one class image changed
    with pytest.raises(CdiffError, match=r"different run: concepts.0.reg images.img0.png.sha256 \("):
        _train(reg, cat_images, sd1_base, resume=True, reg_opts=real)


def test_killed_process_resumes_from_its_periodic_checkpoint(tmp_path, sd1_base, cat_images):
    """SIGKILL cannot be caught: the run resumes from the last checkpoint it wrote every N steps."""
    args = ["train", "mycat", str(cat_images), "--class", "cat", "--base", str(sd1_base), "--steps", "24",
            "--batch-size", "4", "--resolution", str(RES), "--reg", "none", "--aug-pool", "3", "--precision", "fp32",
            "--device", "cpu", "--lr", "1e-3", "--checkpoint-every", "2"]

    def env(home):
        return {**os.environ, "CDIFF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    cmd = [sys.executable, "-m", "cdiff_cli", "--quiet", *args]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    p = subprocess.Popen(cmd, env=env(killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_json = killed / "checkpoints" / "mycat" / "run.json"
    deadline = time.time() + 120
    while not run_json.is_file() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    step = json.loads(run_json.read_text())["step"]
    assert 2 <= step < 24 and Registry(killed).entries() == []
    done = subprocess.run([*cmd, "--resume"], env=env(killed), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ref = subprocess.run(cmd, env=env(whole), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    _assert_same_delta(Registry(whole).get("mycat").load_delta(), Registry(killed).get("mycat").load_delta())


class _Warnings(Progress):
    def __init__(self):
        self.warnings = []

    def warn(self, message):
        self.warnings.append(message)


def test_a_full_disk_costs_the_checkpoint_not_the_run(tmp_path, sd1_base, cat_images, monkeypatch):
    import errno

    from safetensors import SafetensorError

    import cdiff_cli.core.delta as delta_mod
    import cdiff_cli.training.checkpoint as ckpt_mod

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    def torch_full(*a, **k):  # what torch.save raises on a really full disk
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    # Periodic checkpoints fail: a warning each time, and the run still ends with its entry.
    reg, progress = Registry(tmp_path / "a"), _Warnings()
    with monkeypatch.context() as m:
        m.setattr(ckpt_mod.torch, "save", torch_full)
        entry, _ = _train(reg, cat_images, sd1_base, progress=progress, every=2)
    assert entry is not None and len(progress.warnings) == 3  # steps 2, 4, 6 of 7
    assert "could not save the checkpoint at step 2: [enforce fail" in progress.warnings[0]
    # Writing the entry fails: the message says which checkpoint is kept, and --resume finishes the run.
    reg = Registry(tmp_path / "b")
    with monkeypatch.context() as m:  # safetensors raises its own error type on a full disk
        m.setattr(delta_mod, "save_file", lambda *a, **k: (_ for _ in ()).throw(SafetensorError("No space left on device (os error 28)")))
        with pytest.raises(CdiffError, match=r"cannot save concept 'mycat': No space left on device \(os error 28\); "
                                             r"the checkpoint of step 6 is kept"):
            _train(reg, cat_images, sd1_base, every=2)
    assert reg.entries() == [] and not any(p.name.startswith(".") for p in reg.concepts.iterdir())
    resumed, _ = _train(reg, cat_images, sd1_base, resume=True, every=2)
    whole, _ = _train(Registry(tmp_path / "c"), cat_images, sd1_base)
    _assert_same_delta(whole.load_delta(), resumed.load_delta())


def test_checkpoint_leftovers_belong_to_one_name_only(tmp_path):
    """A killed save of `cat-1` leaves `.old-cat-1-<pid>`: it must never be taken for `cat`'s."""
    from cdiff_cli.training.checkpoint import RUN_FILE, STATE_FILE, Checkpointer, leftovers, recover

    root = tmp_path / "checkpoints"
    old = root / ".old-cat-1-4242"
    old.mkdir(parents=True)
    (old / STATE_FILE).write_bytes(b"x")
    (old / RUN_FILE).write_text("{}")
    assert leftovers(root / "cat") == [] and leftovers(root / "cat-1") == [old]
    recover(root / "cat")
    assert not Checkpointer(root / "cat", {}).exists and old.exists()
    recover(root / "cat-1")  # the killed save of cat-1 is completed: its previous version comes back
    assert Checkpointer(root / "cat-1", {}).exists and not old.exists()


def test_default_schedule_is_every_five_minutes_of_training(tmp_path):
    """Whatever a step costs (6 s on a CPU, 0.15 s on an H100), at most 5 minutes of work are lost."""
    from cdiff_cli.training.checkpoint import Checkpointer

    now = [1000.0]
    ck = Checkpointer(tmp_path / "c", {}, clock=lambda: now[0])
    assert ck.describe() == "every 5 minutes"
    due = []
    for step in range(1, 200):
        now[0] += 6.0  # a CPU step
        if ck.due(step, 200):
            due.append(step)
            ck.save({"x": torch.zeros(1)}, step, 200)
    assert due == [51, 101, 151]  # 50 steps x 6 s = 300 s after the first step counted
    assert not ck.due(200, 200)  # never after the last step: the entry is written instead
    assert Checkpointer(tmp_path / "d", {}, every=3).due(6, 10) and not Checkpointer(tmp_path / "d", {}, every=0).due(6, 10)
