"""Frozen layers that keep less for the backward compute exactly what the stock layers compute."""

import pytest
import torch
from diffusers.models.activations import GEGLU

from cdiff_cli.core.layers import trainable_names
from cdiff_cli.models import frozen_ops
from cdiff_cli.models.frozen_ops import saving_less
from cdiff_cli.testing.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline


def _saved_bytes(module, fn) -> tuple[int, torch.Tensor]:
    """Bytes of tensors autograd keeps for the backward while `fn` runs, each storage counted once and
    the module's parameters left out (they are held anyway)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("cfg", [
    dict(cin=8, cout=16, k=3, stride=1, padding=1, groups=1, bias=True),
    dict(cin=8, cout=8, k=3, stride=2, padding=1, groups=1, bias=True),
    dict(cin=8, cout=8, k=1, stride=1, padding=0, groups=1, bias=False),
    dict(cin=8, cout=8, k=3, stride=1, padding=2, groups=2, bias=True, dilation=2),
])
def test_frozen_conv_matches_stock_bit_for_bit(cfg):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cfg["cin"], cfg["cout"], cfg["k"], cfg["stride"], cfg["padding"], cfg.get("dilation", 1),
                           cfg["groups"], cfg["bias"]).requires_grad_(False)
    x = torch.randn(2, cfg["cin"], 12, 12, requires_grad=True)
    y = conv(x)
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)
    with saving_less(conv) as n:
        assert n == 1
        y2 = conv(x)
        (gx2,) = torch.autograd.grad(y2, x, gy)
    assert torch.equal(y, y2) and torch.equal(gx, gx2)


def test_frozen_conv_keeps_no_activation():
    conv = torch.nn.Conv2d(16, 16, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 16, 32, 32, requires_grad=True)
    stock, _ = _saved_bytes(conv, lambda: conv(x))
    with saving_less(conv):
        lean, _ = _saved_bytes(conv, lambda: conv(x))
    assert stock >= x.numel() * 4  # the stock conv keeps its input
    assert lean == 0


def test_frozen_conv_under_bf16_autocast_matches_stock():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 8, 10, 10, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    (gx,) = torch.autograd.grad(y.float().sum(), x)
    with saving_less(conv), torch.autocast("cpu", dtype=torch.bfloat16):
        y2 = conv(x)
    (gx2,) = torch.autograd.grad(y2.float().sum(), x)
    assert y2.dtype == y.dtype == torch.bfloat16 and gx2.dtype == torch.float32
    assert torch.equal(y, y2) and torch.equal(gx, gx2)


def test_geglu_matches_stock_and_keeps_less():
    torch.manual_seed(0)
    geglu = GEGLU(16, 32).requires_grad_(False)
    x = torch.randn(2, 64, 16, requires_grad=True)
    stock_bytes, y = _saved_bytes(geglu, lambda: geglu(x))
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)
    with saving_less(geglu) as n:
        assert n == 1
        lean_bytes, y2 = _saved_bytes(geglu, lambda: geglu(x))
        (gx2,) = torch.autograd.grad(y2, x, gy)
    assert torch.equal(y, y2) and torch.equal(gx, gx2)
    # The stock layer also keeps gelu(gate), half the projection: 2 x 64 x 32 floats.
    assert stock_bytes - lean_bytes == 2 * 64 * 32 * 4


def test_trainable_layers_keep_their_forward_and_everything_is_restored():
    conv = torch.nn.Conv2d(4, 4, 3)
    geglu = GEGLU(4, 8)  # trainable projection
    frozen = torch.nn.Conv2d(4, 4, 3).requires_grad_(False)
    circular = torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular").requires_grad_(False)
    model = torch.nn.ModuleList([conv, geglu, frozen, circular])
    with saving_less(model) as n:
        assert n == 1
        assert "forward" in frozen.__dict__
        assert not any("forward" in m.__dict__ for m in (conv, geglu, circular))
    assert not any("forward" in m.__dict__ for m in model.modules())


def _kv_unet(kind: str = "sd1"):
    torch.manual_seed(0)
    pipe = build_tiny_pipeline(kind) if kind == "sd1" else build_tiny_sdxl_pipeline()
    unet = pipe.unet
    unet.requires_grad_(False)
    params = dict(unet.named_parameters())
    names = trainable_names(unet, "kv")
    for n in names:
        params[n].requires_grad_(True)
    c = unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size)
    t = torch.tensor([10, 500])
    enc = torch.randn(2, 77, c.cross_attention_dim)
    added = None
    if kind == "sdxl":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, pooled), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}

    def grads():
        saved, out = _saved_bytes(unet, lambda: unet(x, t, enc, added_cond_kwargs=added).sample)
        g = torch.autograd.grad(out.square().mean(), [params[n] for n in names])
        return saved, out, g

    return unet, grads


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_unet_kv_gradients_are_bit_identical_and_activations_smaller(kind):
    unet, grads = _kv_unet(kind)
    stock_saved, out, g = grads()
    with saving_less(unet) as n:
        assert n > 0
        lean_saved, out2, g2 = grads()
    assert torch.equal(out, out2)
    assert all(torch.equal(a, b) for a, b in zip(g, g2))
    assert lean_saved < stock_saved
    assert not any("forward" in m.__dict__ for m in unet.modules())


def test_bit_identical_under_gradient_checkpointing_too():
    # The checkpointed blocks run their forward again in the backward: through the lean layers as well.
    unet, grads = _kv_unet()
    _, out, g = grads()
    unet.enable_gradient_checkpointing()
    unet.train()
    with saving_less(unet):
        _, out2, g2 = grads()
    assert torch.equal(out, out2)
    assert all(torch.equal(a, b) for a, b in zip(g, g2))


def test_training_uses_the_lean_layers(tmp_path, monkeypatch):
    from cdiff_cli.training import Concept, TrainConfig, train
    from cdiff_cli.training.images import list_images

    from .conftest import RES, make_images

    counts = []
    real = frozen_ops.saving_less

    def spy(module):
        cm = real(module)

        class Wrapped:
            def __enter__(self):
                counts.append(cm.__enter__())
                return counts[-1]

            def __exit__(self, *exc):
                return cm.__exit__(*exc)

        return Wrapped()

    monkeypatch.setattr(frozen_ops, "saving_less", spy)
    pipe = build_tiny_pipeline("sd1")
    imgs = list_images(make_images(tmp_path / "a"))
    train(pipe, [Concept("<a1>", "cat", imgs)], TrainConfig(steps=1, batch_size=1, resolution=RES))
    assert counts and counts[0] > 0
    assert not any("forward" in m.__dict__ for m in pipe.unet.modules())
