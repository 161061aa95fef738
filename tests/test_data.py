"""Augmentation, caption prefixes, loss mask and crops: the numbers the method prescribes."""

import random

import pytest
import torch
from PIL import Image

from cdiff_cli.training.images import (
    FAR_PREFIXES,
    NEAR_PREFIXES,
    Augmentation,
    apply_augmentation,
    center_square,
    latent_mask,
    masked_mse,
    sample_augmentation,
    to_tensor,
)


def test_augmentation_distribution_and_prefixes():
    rng = random.Random(0)
    size = 512
    draws = [sample_augmentation(rng, size) for _ in range(3000)]
    small = [a for a in draws if a.scale < size]
    big = [a for a in draws if a.scale > size]
    # About 2/3 shrink-and-paste, 1/3 enlarge-and-crop.
    assert 0.6 < (len(small) + sum(a.scale == size for a in draws)) / len(draws) < 0.72
    assert all(size // 3 <= a.scale <= size for a in small)
    assert all(int(1.2 * size) <= a.scale <= int(1.4 * size) + 1 for a in big)
    for a in draws:
        if a.scale < 0.6 * size:
            assert a.prefix in FAR_PREFIXES
        elif a.scale > size:
            assert a.prefix in NEAR_PREFIXES
        else:
            assert a.prefix == ""
        if a.scale < size:
            assert 0 <= a.top <= size - a.scale and 0 <= a.left <= size - a.scale
        else:
            assert -(a.scale - size) <= a.top <= 0
    assert 0.45 < sum(a.flip for a in draws) / len(draws) < 0.55


def test_no_aug_no_flip_is_identity():
    rng = random.Random(1)
    img = torch.rand(3, 64, 64) * 2 - 1
    for _ in range(20):
        a = sample_augmentation(rng, 64, aug=False, hflip=False)
        assert a == Augmentation(64, 0, 0, False, "")
        assert torch.equal(apply_augmentation(img, a), img)
        assert latent_mask(a, 64, 8).sum() == 64


def test_paste_places_image_and_mask_is_box_shrunk_by_one_latent_pixel():
    img = torch.ones(3, 512, 512) * 0.5
    a = Augmentation(scale=256, top=64, left=128, flip=False, prefix="")
    out = apply_augmentation(img, a)
    assert torch.all(out[:, :64] == 0) and torch.all(out[:, :, :128] == 0)  # empty canvas
    assert torch.allclose(out[:, 64:320, 128:384], torch.full((3, 256, 256), 0.5), atol=1e-4)
    m = latent_mask(a, 512, 8)[0]
    rows = m.sum(1).nonzero().flatten()
    cols = m.sum(0).nonzero().flatten()
    # Box in latent pixels: rows 8..40, cols 16..48; shrunk by one on each side.
    assert rows.min() == 9 and rows.max() == 38
    assert cols.min() == 17 and cols.max() == 46
    assert m.sum() == 30 * 30


def test_crop_mask_is_full():
    a = Augmentation(scale=640, top=-10, left=-20, flip=True, prefix="zoomed in ")
    img = torch.rand(3, 512, 512)
    out = apply_augmentation(img, a)
    assert out.shape == (3, 512, 512)
    assert latent_mask(a, 512, 8).sum() == 64 * 64


def test_tiny_paste_never_gives_empty_mask():
    rng = random.Random(3)
    for _ in range(500):
        a = sample_augmentation(rng, 64)
        assert latent_mask(a, 64, 8).sum() > 0


def test_masked_mse_matches_hand_computation():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[2.0, 2.0], [2.0, 2.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    # sample 0: (1 + 16) / 2 = 8.5 ; sample 1: 16 / 4 = 4 ; mean 6.25
    assert masked_mse(pred, target, mask).item() == pytest.approx(6.25)


def test_center_square_keeps_aspect_ratio():
    im = Image.new("RGB", (300, 100))
    sq = center_square(im)
    assert sq.size == (100, 100)
    t = to_tensor(Image.new("RGB", (300, 100), (255, 0, 0)), 32)
    assert t.shape == (3, 32, 32) and torch.allclose(t[0], torch.ones(32, 32))
