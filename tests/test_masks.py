"""Masks beside target photos (`NAME.mask.png`, white where the concept is): never images themselves, checked
before a model loads, and the loss on a masked photo's background weighed by `--background-weight`."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from cdiff_cli import world
from cdiff_cli.registry import Registry
from cdiff_cli.testing.tiny import build_tiny_pipeline
from cdiff_cli.training import Concept, TrainConfig, train
from cdiff_cli.training import loop as training_loop
from cdiff_cli.training.images import Augmentation, list_images, object_weight

from .conftest import RES, make_images
from .test_cli import TRAIN, cdiff


def _mask(path, size=(80, 64), box=(8, 8, 48, 48)):
    im = Image.new("L", size, 0)
    ImageDraw.Draw(im).rectangle(box, fill=255)
    im.save(path)
    return path


def test_masks_are_never_images_and_are_noted_beside_their_photos(tmp_path):
    folder = make_images(tmp_path / "a")
    _mask(folder / "img0.mask.png")
    _mask(folder / "stray.mask.png")  # no photo of that name: ignored
    plain = list_images(folder)
    assert [p.path.name for p in plain] == ["img0.png", "img1.png", "img2.png", "img3.png"]
    assert all(p.mask is None for p in plain)
    masked = list_images(folder, with_masks=True)
    assert masked[0].mask == folder / "img0.mask.png" and all(p.mask is None for p in masked[1:])


def test_the_object_weight_is_one_on_the_object_and_a_ring_and_the_background_weight_elsewhere():
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:24, 32:40] = 1.0  # latent pixel (2, 4) at factor 8
    w = object_weight(mask, Augmentation(64, 0, 0, False, ""), 8, 0.25)
    expected = torch.full((1, 8, 8), 0.25)
    expected[:, 1:4, 3:6] = 1.0
    assert torch.equal(w, expected)
    flipped = object_weight(mask, Augmentation(64, 0, 0, True, ""), 8, 0.25)  # the photo's flip moves it too
    assert torch.equal(flipped, expected.flip(-1))
    assert torch.equal(object_weight(mask, Augmentation(64, 0, 0, False, ""), 8, 1.0), torch.ones(1, 8, 8))


def _train_with_masks(folder, monkeypatch, background: float):
    """Train a tiny model on `folder`; returns the delta and the loss masks of the target images."""
    seen = []
    real = training_loop.masked_mse_per_sample

    def spy(pred, target, mask):
        seen.append(mask.detach().clone())
        return real(pred, target, mask)

    monkeypatch.setattr(training_loop, "masked_mse_per_sample", spy)
    cfg = TrainConfig(steps=4, batch_size=2, lr=1e-3, resolution=RES, aug=False, hflip=False, background_weight=background)
    imgs = list_images(folder, with_masks=True)
    delta = train(build_tiny_pipeline("sd1"), [Concept("<a1>", "cat", imgs)], cfg).delta
    return delta, torch.cat(seen)


def test_training_weighs_a_masked_photos_background_and_ignores_masks_at_weight_one(tmp_path, monkeypatch):
    folder = make_images(tmp_path / "a", size=(64, 64))
    unmasked, masks_before = _train_with_masks(folder, monkeypatch, 0.3)
    assert torch.equal(masks_before, torch.ones_like(masks_before))  # no masks: the method's loss as it was
    for i in range(4):
        _mask(folder / f"img{i}.mask.png", size=(64, 64), box=(0, 0, 15, 15))  # the top-left 16 px: latent 2x2
    weighted, masks = _train_with_masks(folder, monkeypatch, 0.3)
    expected = torch.full((1, 8, 8), 0.3)
    expected[:, 0:3, 0:3] = 1.0  # the object's latent pixels and a one-pixel ring
    assert all(torch.allclose(m, expected) for m in masks)
    ignored, masks_one = _train_with_masks(folder, monkeypatch, 1.0)
    assert torch.equal(masks_one, torch.ones_like(masks_one))
    for n in unmasked.weights:
        assert torch.equal(ignored.weights[n], unmasked.weights[n])  # weight 1: the masks change nothing
    assert any(not torch.equal(weighted.weights[n], unmasked.weights[n]) for n in unmasked.weights)


@pytest.mark.parametrize("bad, words", [
    (lambda p: _mask(p, size=(40, 40)), "is 40x40 px but its photo is 80x64"),
    (lambda p: Image.new("L", (80, 64), 0).save(p), "marks nothing"),
    (lambda p: p.write_bytes(b"not a png"), "cannot be read as an image"),
])
def test_a_bad_mask_is_refused_naming_its_file_before_a_model_loads(home, sd1_base, cat_images, bad, words):
    bad(cat_images / "img1.mask.png")
    r = cdiff("train", "mycat", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN, ok=False)
    assert r.exit_code == 1, r.output
    assert "img1.mask.png" in r.output and words in r.output and "Traceback" not in r.output
    assert not Registry(home).exists("mycat")


def test_the_entry_records_each_photos_mask(home, sd1_base, cat_images):
    _mask(cat_images / "img0.mask.png")
    cdiff("train", "mycat", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN, "--background-weight", "0.1")
    entry = Registry(home).get("mycat")
    images = {i["file"]: i for i in entry.manifest["concepts"][0]["images"]}
    assert set(images) == {"img0.png", "img1.png", "img2.png", "img3.png"}  # the mask is not a photo
    assert len(images["img0.png"]["mask_sha256"]) == 64 and "mask_sha256" not in images["img1.png"]
    assert entry.manifest["train"]["background_weight"] == 0.1


def test_the_worlds_concept_masks_cover_exactly_what_differs_from_the_background(tmp_path):
    paths = world.save_concept_images("pinksquare", tmp_path, n=3, seed=0, masks=True)
    items = list_images(tmp_path, with_masks=True)
    assert [i.path for i in items] == paths and all(i.mask is not None for i in items)
    for spec, item in zip(world.concept_specs("pinksquare", 3, 0), items):
        photo = np.asarray(Image.open(item.path), dtype=np.int16)
        mask = np.asarray(Image.open(item.mask)) > 0
        differs = np.abs(photo - np.array(spec.bg_rgb)).max(-1) > 40
        near = np.pad(mask, 1)
        near = near[:-2, 1:-1] | near[2:, 1:-1] | near[1:-1, :-2] | near[1:-1, 2:] | mask  # one pixel around it
        assert mask.any() and not (differs & ~near).any()  # nothing unlike the background lies outside (edges aside)
        assert (differs & mask).sum() >= 0.9 * mask.sum()  # and the mask holds little background


def test_the_python_api_takes_the_background_weight(tmp_path, sd1_base, cat_images):
    import cdiff_cli as cdiff

    _mask(cat_images / "img2.mask.png")
    run = cdiff.train("mycat", cat_images, class_word="cat", base=str(sd1_base), registry=tmp_path / "reg",
                      steps=2, batch_size=2, resolution=RES, num_reg=2, device="cpu", samples=False, background_weight=0.5)
    assert run.entry.manifest["train"]["background_weight"] == 0.5
    assert "mask_sha256" in run.entry.manifest["concepts"][0]["images"][2]
