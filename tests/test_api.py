"""The Python API (`import cdiff_cli`), without the CLI: the whole loop on a tiny base, its defaults, its errors."""

import inspect

import numpy as np
import pytest
import torch

import cdiff_cli as cdiff
from cdiff_cli.defaults import GEN, TRAIN

from .conftest import RES

SMALL = dict(steps=4, batch_size=2, resolution=RES, num_reg=2, device="cpu")


def test_the_loop_through_the_api(tmp_path, sd1_base, cat_images, chair_images):
    reg = cdiff.Registry(tmp_path / "home")
    cat = cdiff.train("mycat", cat_images, class_word="cat", base=str(sd1_base), registry=reg, **SMALL)
    assert isinstance(cat, cdiff.Trained) and cat.entry.tokens == ["<mycat>"] and len(cat.losses) == 4
    assert cat.effective_lr == pytest.approx(2e-5)  # TRAIN.lr x batch 2: the CLI's lr scaling
    cdiff.train("mychair", chair_images, class_word="chair", token="V2", base=str(sd1_base), registry=reg, **SMALL)
    assert [e.name for e in reg.entries()] == ["mycat", "mychair"]

    gen = dict(steps=3, height=RES, width=RES, device="cpu", registry=reg)
    plain = cdiff.generate("photo of a cat", base=str(sd1_base), **gen)
    mine = cdiff.generate("photo of a <mycat> cat", **gen)
    assert len(mine) == 1 and mine[0].size == (RES, RES)
    assert not np.array_equal(np.asarray(plain[0]), np.asarray(mine[0]))  # the delta changes the image

    both = cdiff.merge(["mycat", "mychair"], registry=reg)
    assert both.name == "mycat+mychair" and both.tokens == ["<mycat>", "V2"]

    files = cdiff.export("mycat", tmp_path / "exp", format="diffusers", registry=reg)
    assert any(f.name == "pytorch_custom_diffusion_weights.safetensors" for f in files)
    copy = cdiff.add("mycat2", tmp_path / "exp", tokens=["<cat2>"], classes=["cat"], base=str(sd1_base), registry=reg)
    again = cdiff.generate("photo of a <cat2> cat", **gen)
    assert copy.tokens == ["<cat2>"] and np.array_equal(np.asarray(again[0]), np.asarray(mine[0]))

    entry, report = cdiff.compress("mycat", rank=2, registry=reg)
    assert entry.name == "mycat" and report["max_rank"] <= 2 and report["bytes_after"] < report["bytes_before"]


def test_joint_training_through_the_api(tmp_path, sd1_base, cat_images, chair_images):
    reg = cdiff.Registry(tmp_path / "home")
    run = cdiff.train("pair", concepts=[cdiff.Concept("<c1>", "cat", cat_images), cdiff.Concept("<c2>", "chair", chair_images)],
                      base=str(sd1_base), registry=reg, **SMALL)
    assert run.entry.tokens == ["<c1>", "<c2>"] and run.entry.classes == ["cat", "chair"]


def test_api_errors_are_cdiff_errors_and_write_nothing(tmp_path, sd1_base, cat_images):
    reg = cdiff.Registry(tmp_path / "home")
    with pytest.raises(cdiff.CdiffError, match="class_word"):
        cdiff.train("x", cat_images, registry=reg)
    with pytest.raises(cdiff.CdiffError, match="not both"):
        cdiff.train("x", cat_images, class_word="cat", concepts=[cdiff.Concept("<a>", "cat", cat_images)], registry=reg)
    with pytest.raises(cdiff.NotFoundError):
        cdiff.generate("photo of a <nobody> cat", registry=reg, base=str(sd1_base))
    with pytest.raises(cdiff.CdiffError, match="unknown evaluation setting"):
        cdiff.evaluate(["x"], registry=reg, nonsense=1)
    assert reg.entries() == []


def _cli_default(command, option: str):
    """The default of a Typer command's parameter."""
    return inspect.signature(command).parameters[option].default


def test_api_and_cli_share_their_defaults():
    from cdiff_cli.cli.gen_cmd import gen_cmd
    from cdiff_cli.cli.train_cmd import train_cmd

    train = inspect.signature(cdiff.train).parameters
    for field in ("steps", "batch_size", "lr", "num_reg", "seed", "aug_pool", "device", "sample_every", "anchor"):
        assert train[field].default == getattr(TRAIN, field) == _cli_default(train_cmd, field), field
    assert train["samples"].default is True and _cli_default(train_cmd, "no_samples") is False
    assert _cli_default(train_cmd, "mode").value == train["mode"].default == TRAIN.mode
    assert _cli_default(train_cmd, "precision").value == train["precision"].default == "auto"
    generate = inspect.signature(cdiff.generate).parameters
    for field in ("n", "steps", "guidance", "seed", "batch_size", "device"):
        assert generate[field].default == getattr(GEN, field) == _cli_default(gen_cmd, field), field
    assert _cli_default(gen_cmd, "scheduler").value == generate["scheduler"].default == "dpm"
    assert _cli_default(gen_cmd, "precision").value == generate["precision"].default == "fp16"


def test_import_is_light_and_documents_the_api():
    import subprocess
    import sys

    code = "import sys, cdiff_cli as c; print('torch' in sys.modules, 'diffusers' in sys.modules, c.train.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "cdiff_cli.api"]
    for name in ("train", "merge", "generate", "evaluate", "add", "export", "compress", "Registry"):
        assert name in cdiff.__all__ and name in cdiff.__doc__
    assert torch is not None  # the engine itself is importable beside the facade


def test_api_training_leaves_signals_alone_and_stops_when_asked(tmp_path, sd1_base, cat_images):
    """The engine installs no signal handler (that is the CLI's business, through StopSignals); a `stop`
    object whose flag is set makes the run checkpoint and raise TrainingStopped, and resume=True finishes it."""
    import signal
    from contextlib import contextmanager

    from cdiff_cli.progress import Progress, Task

    class Stop:
        requested = False

    stop, handlers = Stop(), []

    class AskAfterTwo(Progress):
        @contextmanager
        def task(self, description, total):
            class _T(Task):
                count = 0

                def advance(self, n=1, **fields):
                    self.count += n
                    handlers.append(signal.getsignal(signal.SIGINT))
                    if description == "training" and self.count == 2:
                        stop.requested = True

            yield _T()

    reg = cdiff.Registry(tmp_path / "home")
    before = signal.getsignal(signal.SIGINT)
    args = dict(class_word="cat", base=str(sd1_base), registry=reg, checkpoint_every=0, **SMALL)
    with pytest.raises(cdiff.TrainingStopped, match="step 2/"):
        cdiff.train("mycat", cat_images, stop=stop, progress=AskAfterTwo(), **args)
    assert handlers and all(h is before for h in handlers) and reg.entries() == []
    run = cdiff.train("mycat", cat_images, resume=True, **args)
    assert run.entry.name == "mycat" and signal.getsignal(signal.SIGINT) is before
