"""Preflight memory estimate and the low-memory configuration."""

import torch

from cdiff_cli.data import list_images
from cdiff_cli.layers import trainable_names
from cdiff_cli.memory import Estimate, estimate_training_memory, preflight_warning
from cdiff_cli.tiny import build_tiny_pipeline
from cdiff_cli.train import Concept, TrainConfig, low_memory_config, train

from .conftest import RES, make_images

SD15 = dict(frozen_params=860_000_000 + 123_000_000 - 19_000_000, trainable_params=19_000_000, unet_params=860_000_000)


def test_estimate_scales_as_documented():
    full = estimate_training_memory(frozen_bytes_per_param=2, images_per_pass=8, resolution=512, half=True, cuda=True, **SD15)
    low = estimate_training_memory(frozen_bytes_per_param=2, images_per_pass=1, resolution=512, half=True,
                                   gradient_checkpointing=True, cuda=True, **SD15)
    assert full.weights == low.weights == (983_000_000 - 19_000_000) * 2
    assert full.trainable == 19_000_000 * 16  # fp32 weight + grad + 2 AdamW moments
    assert abs(full.activations / low.activations - 8 / 0.35) < 1e-6
    assert low.total < 8e9 * 0.9 < full.total  # --low-memory fits an 8 GB GPU by the estimate; batch 8 does not
    half_res = estimate_training_memory(frozen_bytes_per_param=2, images_per_pass=8, resolution=256, half=True, **SD15)
    assert abs(full.activations / half_res.activations - 4) < 1e-6


def test_preflight_warns_only_when_short():
    e = Estimate(weights=2e9, trainable=0.3e9, activations=5e9, overhead=0.6e9)
    assert preflight_warning(e, 16e9, low_memory=False) is None
    msg = preflight_warning(e, 6e9, low_memory=False)
    assert "7.9 GB" in msg and "--low-memory" in msg
    assert "--low-memory" not in preflight_warning(e, 6e9, low_memory=True)
    assert preflight_warning(e, None, low_memory=False) is None


def test_low_memory_training_trains_the_same_parameters(tmp_path):
    cfg = low_memory_config(TrainConfig(steps=3, batch_size=4, lr=1e-3, resolution=RES, precision="fp32"))
    assert cfg.gradient_checkpointing and cfg.micro_batch == 1 and cfg.low_memory
    pipe = build_tiny_pipeline("sd1")
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    imgs = list_images(make_images(tmp_path / "a"))
    res = train(pipe, [Concept("<a1>", "cat", imgs, reg=imgs)], cfg)
    changed = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(trainable_names(pipe.unet, "kv"))
    assert len(res.losses) == 3 and all(v > 0 for v in res.losses)
