"""Frozen layers that keep less for the backward pass.

Custom Diffusion backpropagates through almost the whole UNet to reach the cross-attention k/v
weights, but it never needs a gradient for a frozen weight: only the gradient with respect to each
layer's input. PyTorch's autograd does not know that for every layer:

- a `conv2d` saves its input even when its weight is frozen (a frozen `linear` does not). The input
  gradient needs only the weight, so `FrozenConv2d` keeps nothing but a reference to the weight.
- diffusers' `GEGLU` (`h * gelu(gate)`) keeps the projection *and* `gelu(gate)`, a tensor half the
  projection's size; `GEGLUFunction` keeps the projection and recomputes `gelu(gate)` (a cheap
  elementwise op) in the backward.

Both compute exactly what the stock layers compute, forward and backward (bit-identical in fp32;
tested), and on the full SD 1.x UNet they cut the activations alive at the end of a forward by about
200 MB at 256 px, batch 2 (a third of them; see benchmarks/bench_train.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input


class FrozenConv2d(torch.autograd.Function):
    """`F.conv2d` whose backward returns only the input gradient, so the input is not kept."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)  # the layer's own parameter: no extra memory
        ctx.conf = (x.shape, x.dtype, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, dtype, stride, padding, dilation, groups = ctx.conf
        # Under autocast the forward ran in the low precision: the weight is cast the same way here.
        gx = conv2d_input(shape, weight.to(grad.dtype), grad, stride, padding, dilation, groups)
        return gx.to(dtype), None, None, None, None, None, None


class GEGLUFunction(torch.autograd.Function):
    """`h * gelu(gate)` for `h, gate = proj.chunk(2, -1)`, keeping only `proj` for the backward."""

    @staticmethod
    def forward(ctx, proj):
        ctx.save_for_backward(proj)
        h, gate = proj.chunk(2, dim=-1)
        return h * F.gelu(gate)

    @staticmethod
    def backward(ctx, grad):
        (proj,) = ctx.saved_tensors
        h, gate = proj.chunk(2, dim=-1)
        return torch.cat([grad * F.gelu(gate), torch.ops.aten.gelu_backward(grad * h, gate)], dim=-1)


def _conv_forward(m: torch.nn.Conv2d):
    def forward(x):
        return FrozenConv2d.apply(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
    return forward


def _geglu_forward(m: torch.nn.Module):
    def forward(hidden_states, *args, **kwargs):
        return GEGLUFunction.apply(m.proj(hidden_states))
    return forward


def _replaceable(m: torch.nn.Module) -> str | None:
    """Which lean forward fits this module, if any: only frozen layers with the stock behaviour."""
    if "forward" in m.__dict__:  # someone (accelerate's offload hooks, another patch) already wraps it
        return None
    if type(m) is torch.nn.Conv2d:
        if m.weight.requires_grad or (m.bias is not None and m.bias.requires_grad):
            return None
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            return None
        return "conv"
    if type(m).__name__ == "GEGLU" and isinstance(getattr(m, "proj", None), torch.nn.Linear):
        from diffusers.utils import is_torch_npu_available

        if is_torch_npu_available() or m.proj.weight.requires_grad:  # diffusers has a fused kernel on NPUs
            return None
        return "geglu"
    return None


@contextmanager
def saving_less(module: torch.nn.Module) -> Iterator[int]:
    """While active, the frozen `Conv2d` and `GEGLU` layers inside `module` use the functions above.

    Call it after choosing what is trainable: a layer with a trainable parameter keeps its stock
    forward. Yields how many layers were switched; everything is restored on exit."""
    switched = []
    for m in module.modules():
        kind = _replaceable(m)
        if kind is not None:
            m.forward = _conv_forward(m) if kind == "conv" else _geglu_forward(m)
            switched.append(m)
    try:
        yield len(switched)
    finally:
        for m in switched:
            del m.forward
