"""--offload: the frozen UNet weights leave the device between layer runs; training is unchanged."""

import contextlib

import pytest
import torch

from cdiff_cli import offload
from cdiff_cli.data import list_images
from cdiff_cli.layers import trainable_names
from cdiff_cli.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline
from cdiff_cli.train import Concept, TrainConfig, train

from .conftest import RES, make_images


def _train(pipe, imgs, **kw):
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-3, resolution=RES, **kw)
    return train(pipe, [Concept("<a1>", "cat", imgs, reg=imgs)], cfg)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_offloaded_training_gives_the_same_weights_as_checkpointed_training(tmp_path, monkeypatch, kind):
    build = build_tiny_sdxl_pipeline if kind == "sdxl" else (lambda: build_tiny_pipeline("sd1"))
    imgs = list_images(make_images(tmp_path / "a"))
    ref, off = build(), build()
    a = _train(ref, imgs, gradient_checkpointing=True)

    real, seen = offload.frozen_weights_offloaded, []

    @contextlib.contextmanager
    def spy(module, device):
        with real(module, device) as n:
            seen.append((n, sum(p.device.type == "meta" for p in module.parameters()), module.is_gradient_checkpointing))
            yield n

    monkeypatch.setattr(offload, "frozen_weights_offloaded", spy)
    b = _train(off, imgs, offload=True)  # turns checkpointing on by itself
    (n_layers, n_meta, checkpointed), = seen
    assert n_layers > 0 and n_meta > 0 and checkpointed  # training really ran offloaded
    assert a.losses == b.losses
    assert a.delta.weights.keys() == b.delta.weights.keys()
    for n, w in a.delta.weights.items():
        assert torch.equal(w, b.delta.weights[n]), n
    assert torch.equal(a.delta.embeddings, b.delta.embeddings)
    # Afterwards the pipeline is whole again: real weights, no hooks, and the same outputs.
    for (n, p), (_, q) in zip(ref.unet.named_parameters(), off.unet.named_parameters()):
        assert p.device.type == "cpu" and torch.equal(p, q), n
    assert not any(hasattr(m, "_hf_hook") or "forward" in m.__dict__ for m in off.unet.modules())
    assert not off.unet.is_gradient_checkpointing


def test_between_layer_runs_only_the_trainable_weights_stay_and_each_layer_runs_with_its_own():
    pipe = build_tiny_pipeline("sd1")
    unet = pipe.unet
    unet.requires_grad_(False)
    names = set(trainable_names(unet, "kv"))
    for n, p in unet.named_parameters():
        p.requires_grad_(n in names)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    x = torch.randn(1, 4, RES // 8, RES // 8)
    text = torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        expected = unet(x, 10, text).sample

    with offload.frozen_weights_offloaded(unet, "cpu") as n_layers:
        assert n_layers > 0
        off_device = {n for n, p in unet.named_parameters() if p.device.type == "meta"}
        assert off_device == set(before) - names  # everything but the trainable weights is off the device
        with torch.no_grad():
            out = unet(x, 10, text).sample
        # Each layer had its own weights while it ran (a meta weight would have made the output meta)...
        assert out.device.type == "cpu" and torch.equal(out, expected)
        # ...and dropped them again afterwards.
        assert {n for n, p in unet.named_parameters() if p.device.type == "meta"} == off_device
    for n, p in unet.named_parameters():
        assert torch.equal(p, before[n]), n


def test_resident_params_count_trainable_unblocked_and_the_largest_block():
    pipe = build_tiny_sdxl_pipeline()
    unet = pipe.unet
    unet.requires_grad_(False)
    names = set(trainable_names(unet, "kv"))
    for n, p in unet.named_parameters():
        p.requires_grad_(n in names)
    total = sum(p.numel() for p in unet.parameters())
    trainable = sum(p.numel() for n, p in unet.named_parameters() if n in names)
    resident = offload.resident_params(unet)
    assert trainable < resident < total
    # By hand: every parameter not inside a ResNet or transformer block, plus the biggest such block.
    blocks = {}
    outside = 0
    for n, p in unet.named_parameters():
        parts = n.split(".")
        for i, part in enumerate(parts[:-1]):
            if part in ("resnets", "transformer_blocks") and parts[i + 1].isdigit():
                key = ".".join(parts[: i + 2])
                if not p.requires_grad:
                    blocks[key] = blocks.get(key, 0) + p.numel()
                    break
        else:
            outside += p.numel()
            continue
        if p.requires_grad:
            outside += p.numel()
    assert resident == outside + max(blocks.values())
