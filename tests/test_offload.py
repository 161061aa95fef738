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


def _checkpointing(module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in module.modules())


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_offloaded_training_gives_the_same_weights_as_checkpointed_training(tmp_path, monkeypatch, kind):
    build = build_tiny_sdxl_pipeline if kind == "sdxl" else (lambda: build_tiny_pipeline("sd1"))
    imgs = list_images(make_images(tmp_path / "a"))
    ref, off = build(), build()
    a = _train(ref, imgs, gradient_checkpointing=True)

    real, seen = offload.frozen_weights_offloaded, {}

    @contextlib.contextmanager
    def spy(module, device):
        with real(module, device) as n:
            seen[module] = (n, sum(p.device.type == "meta" for p in module.parameters()), _checkpointing(module))
            yield n

    monkeypatch.setattr(offload, "frozen_weights_offloaded", spy)
    b = _train(off, imgs, offload=True)  # turns checkpointing on by itself
    encoders = [off.text_encoder] + ([off.text_encoder_2] if kind == "sdxl" else [])
    assert set(seen) == {off.unet, *encoders}  # the UNet and every text encoder
    for n_layers, n_meta, checkpointed in seen.values():
        assert n_layers > 0 and n_meta > 0 and checkpointed  # training really ran offloaded
    assert a.losses == b.losses
    assert a.delta.weights.keys() == b.delta.weights.keys()
    for n, w in a.delta.weights.items():
        assert torch.equal(w, b.delta.weights[n]), n
    assert torch.equal(a.delta.embeddings, b.delta.embeddings)
    if kind == "sdxl":
        assert torch.equal(a.delta.embeddings_2, b.delta.embeddings_2)
    # Afterwards the pipeline is whole again: real weights, no hooks, no checkpointing, the same modes.
    for name in ("unet", "text_encoder", "text_encoder_2"):
        mine, theirs = getattr(off, name, None), getattr(ref, name, None)
        if mine is None:
            continue
        for (n, p), (_, q) in zip(theirs.named_parameters(), mine.named_parameters()):
            assert p.device.type == "cpu" and torch.equal(p, q), n
        assert not any(hasattr(m, "_hf_hook") or "forward" in m.__dict__ for m in mine.modules())
        assert not _checkpointing(mine), name
        assert [m.training for m in mine.modules()] == [m.training for m in theirs.modules()], name
    assert not any(hasattr(te, "_require_grads_hook") for te in encoders)


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


def test_a_checkpointed_text_encoder_recomputes_each_layer_in_the_backward_with_the_same_gradients():
    te = build_tiny_pipeline("sd1").text_encoder.eval()
    te.requires_grad_(False)
    rows = torch.nn.Parameter(torch.randn(1, te.config.hidden_size))
    te.get_input_embeddings().register_forward_hook(lambda m, i, out: out + rows)  # what the token rows do
    calls = []
    layer = getattr(te, "text_model", te).encoder.layers[0]  # transformers 5 flattened CLIPTextModel
    layer.mlp.fc1.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, te.config.vocab_size, (2, 16))

    def run():
        rows.grad, calls[:] = None, []
        out = te(ids)[0]
        out.square().sum().backward()
        return out.detach(), rows.grad.clone(), len(calls)

    plain = run()
    with offload.text_encoder_checkpointed(te):
        assert _checkpointing(te)
        checkpointed = run()
    assert (plain[2], checkpointed[2]) == (1, 2)  # recomputed in the backward
    assert torch.equal(plain[0], checkpointed[0]) and torch.equal(plain[1], checkpointed[1])
    assert not _checkpointing(te) and not any(m.training for m in te.modules())


def test_offload_with_cut_down_token_tables_as_cdiff_train_runs_it(tmp_path):
    """`cdiff train --offload` on a GPU: the cut-down tables (keep_pipe=False) are offloaded like any layer."""
    imgs = list_images(make_images(tmp_path / "a"))
    cfg = dict(steps=3, batch_size=2, lr=1e-3, resolution=RES)
    a = train(build_tiny_sdxl_pipeline(), [Concept("<a1>", "cat", imgs, reg=imgs)], TrainConfig(**cfg, gradient_checkpointing=True))
    pipe = build_tiny_sdxl_pipeline()
    b = train(pipe, [Concept("<a1>", "cat", imgs, reg=imgs)], TrainConfig(**cfg, offload=True), keep_pipe=False)
    assert type(pipe.text_encoder_2.get_input_embeddings()).__name__ == "UsedRows"
    assert a.losses == b.losses
    assert torch.equal(a.delta.embeddings_2, b.delta.embeddings_2)
    assert all(torch.equal(w, b.delta.weights[n]) for n, w in a.delta.weights.items())
