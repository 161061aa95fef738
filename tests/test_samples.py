"""Samples while training (`cdiff train --sample/--sample-every/--no-samples`): grids at the asked steps,
the same seeds each time, the last kept in the entry, and a run that learns exactly what it learns without."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cdiff_cli.testing.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline
from cdiff_cli.training import Concept, TrainConfig, train
from cdiff_cli.training.images import ImageItem, list_images
from cdiff_cli.training.samples import SampleSettings, TrainingSampler, grid

from .conftest import RES, make_images
from .test_cli import TRAIN, cdiff, out_json


def _sampler(folder, every=0, prompts=("photo of a <a1> cat",), n=2):
    return TrainingSampler(SampleSettings(prompts=tuple(prompts), every=every, n=n, steps=3), folder, RES, 6.0)


def test_sampling_points_are_every_n_steps_and_the_last():
    assert SampleSettings().points(250) == [250]
    assert SampleSettings(every=100).points(250) == [100, 200, 250]
    assert SampleSettings(every=50).points(100) == [50, 100]
    assert SampleSettings(every=300).points(250) == [250]
    for every, total in ((0, 7), (1, 5), (3, 10), (4, 8), (300, 250)):
        sampler = TrainingSampler(SampleSettings(every=every), None, RES, 6.0)
        assert [d for d in range(1, total + 1) if sampler.due(d, total)] == SampleSettings(every=every).points(total)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_sampling_changes_nothing_the_run_learns(tmp_path, arch):
    """Trained with a grid after every step and without any: the same delta, the same losses."""
    imgs = list_images(make_images(tmp_path / "a"))
    reg = [ImageItem(i.path, "photo of a cat") for i in imgs[:2]]
    results, sampler = [], None
    for with_samples in (False, True):
        pipe = build_tiny_sdxl_pipeline() if arch == "sdxl" else build_tiny_pipeline("sd1")
        cfg = TrainConfig(steps=3, batch_size=4, lr=1e-3, resolution=RES, aug_pool=2)
        sampler = _sampler(tmp_path / "grids", every=1) if with_samples else None
        results.append(train(pipe, [Concept("<a1>", "cat", imgs, reg=reg)], cfg, keep_pipe=False, sampler=sampler))
    plain, sampled = results
    assert plain.losses == sampled.losses
    assert torch.equal(plain.delta.embeddings, sampled.delta.embeddings)
    assert all(torch.equal(plain.delta.weights[n], sampled.delta.weights[n]) for n in plain.delta.weights)
    assert [p.name for p in sampler.grids] == ["step-000001.png", "step-000002.png", "step-000003.png"]
    assert sampled.sample_seconds == pytest.approx(sampler.seconds) and sampler.seconds > 0


def test_the_same_weights_give_the_same_grid_and_learning_shows(tmp_path):
    """Same seeds at every point: sampled twice without training in between, the grids are pixel-equal;
    after training the token's images differ."""
    pipe = build_tiny_pipeline("sd1")
    from cdiff_cli.core.tokens import add_tokens

    add_tokens(pipe.tokenizer, pipe.text_encoder, ["<a1>"], torch.zeros(1, pipe.text_encoder.config.hidden_size))
    s = _sampler(tmp_path / "g")
    a = np.asarray(Image.open(s(pipe, 1, torch.device("cpu"), torch.autocast("cpu", enabled=False))))
    b = np.asarray(Image.open(s(pipe, 2, torch.device("cpu"), torch.autocast("cpu", enabled=False))))
    assert np.array_equal(a, b)
    # one row of 2 images of 128 px (64 px enlarged), with a text line above
    assert a.shape == (4 + 16 + 128 + 4, 4 + 2 * (128 + 4), 3)
    params = json.loads(Image.open(s.grids[0]).text["parameters"])
    assert params["seeds"] == [0, 1] and params["step"] == 1 and params["prompts"] == ["photo of a <a1> cat"]
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[-1] += 5.0
    c = np.asarray(Image.open(s(pipe, 3, torch.device("cpu"), torch.autocast("cpu", enabled=False))))
    assert not np.array_equal(a, c)


def test_grid_is_a_row_per_prompt():
    imgs = [Image.new("RGB", (32, 32), (255, 0, 0))] * 3
    g = grid([("one", imgs), ("two", imgs[:1])], 40)
    assert g.size == (4 + 3 * 44, 4 + 2 * (16 + 40 + 4))
    assert g.getpixel((4 + 5, 4 + 16 + 5)) == (255, 0, 0)  # first image of row one
    assert g.getpixel((4 + 44 + 5, 4 + 60 + 16 + 5)) == (255, 255, 255)  # row two has one image


def test_cli_samples_every_n_steps_and_keeps_the_last_in_the_entry(home, sd1_base, cat_images):
    r = cdiff("train", "mycat", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN,
              "--sample", "a <mycat> cat on a beach", "--sample", "photo of a <mycat> cat", "--sample-every", 2, "--json")
    info = out_json(r)
    kept = home / "concepts" / "mycat" / "samples.png"
    assert info["samples"] == str(kept) and kept.is_file() and info["sample_seconds"] > 0
    assert sorted(p.name for p in (home / "samples" / "mycat").iterdir()) == ["step-000002.png", "step-000004.png"]
    assert kept.read_bytes() == (home / "samples" / "mycat" / "step-000004.png").read_bytes()
    params = json.loads(Image.open(kept).text["parameters"])
    assert params["step"] == 4 and params["seeds"] == [0, 1, 2, 3]
    assert params["prompts"] == ["a <mycat> cat on a beach", "photo of a <mycat> cat"]
    assert Image.open(kept).height == 4 + 2 * (16 + 128 + 4)  # two prompts, two rows
    shown = out_json(cdiff("show", "mycat", "--json"))
    assert shown["samples"]["grids"] == 2 and shown["samples"]["every"] == 2 and shown["samples"]["file"] == "samples.png"
    assert "samples.png" in cdiff("show", "mycat").stdout

    # --force starts over: the earlier run's grids go; the default is one grid at the end, of "photo of a TOKEN CLASS".
    cdiff("train", "mycat", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN, "--force")
    assert [p.name for p in (home / "samples" / "mycat").iterdir()] == ["step-000004.png"]
    assert json.loads(Image.open(kept).text["parameters"])["prompts"] == ["photo of a <mycat> cat"]
    cdiff("rm", "-y", "mycat")  # the grids go with the entry
    assert not (home / "samples" / "mycat").exists()


def test_cli_no_samples(home, sd1_base, cat_images):
    info = out_json(cdiff("train", "mycat", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN, "--no-samples", "--json"))
    assert info["samples"] is None and info["sample_seconds"] == 0
    assert not (home / "concepts" / "mycat" / "samples.png").exists() and not (home / "samples" / "mycat").exists()
    assert "samples" not in out_json(cdiff("show", "mycat", "--json"))
    r = cdiff("train", "other", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN, "--no-samples",
              "--sample", "x", ok=False)
    assert r.exit_code != 0 and "--no-samples cannot go with --sample" in r.output
    assert not (home / "concepts" / "other").exists()


def test_a_failed_grid_costs_the_samples_not_the_run(tmp_path):
    """Making the samples fails (say the disk is full): a warning, and the run trains on to its end."""
    imgs = list_images(make_images(tmp_path / "a"))
    sampler = _sampler(tmp_path / "grids", every=1)
    warnings = []

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    sampler._save = broken

    from cdiff_cli.progress import Progress

    class Warnings(Progress):
        def warn(self, message):
            warnings.append(message)

    result = train(build_tiny_pipeline("sd1"), [Concept("<a1>", "cat", imgs)],
                   TrainConfig(steps=2, batch_size=2, lr=1e-3, resolution=RES, aug_pool=2), sampler=sampler,
                   progress=Warnings())
    assert len(result.losses) == 2 and len(warnings) == 2
    assert "No space left on device; training goes on" in warnings[0]
