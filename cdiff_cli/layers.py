"""Which UNet parameters Custom Diffusion trains, and how to read and write them."""

from __future__ import annotations

import hashlib

import torch

MODES = ("kv", "crossattn")
_KV = ("attn2.to_k.weight", "attn2.to_v.weight")
_QOUT = ("attn2.to_q.weight", "attn2.to_out.0.weight", "attn2.to_out.0.bias")


def trainable_names(unet: torch.nn.Module, mode: str = "kv") -> list[str]:
    """Names of the cross-attention parameters trained in `mode` ("kv" or "crossattn")."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    suffixes = _KV + (_QOUT if mode == "crossattn" else ())
    return [n for n, _ in unet.named_parameters() if n.endswith(suffixes)]


def kv_names(names) -> list[str]:
    return [n for n in names if n.endswith(_KV)]


def read_weights(unet: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(unet.named_parameters())
    return {n: params[n].detach().to("cpu", torch.float32).clone() for n in names}


@torch.no_grad()
def write_weights(unet: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` into the UNet in place (in the UNet's own dtype and device)."""
    params = dict(unet.named_parameters())
    for name, value in weights.items():
        if name not in params:
            raise KeyError(name)
        p = params[name]
        if p.shape != value.shape:
            raise ValueError(f"{name}: shape {tuple(value.shape)} does not match the base's {tuple(p.shape)}")
        p.copy_(value.to(p.device, p.dtype))


def fingerprint(unet: torch.nn.Module) -> str:
    """A short hash of the base's cross-attention k/v weights: identifies the base a delta belongs to."""
    h = hashlib.sha256()
    params = dict(unet.named_parameters())
    for name in sorted(kv_names(params)):
        # Hash in fp16 so a base loaded in fp16 or fp32 gets the same fingerprint.
        t = params[name].detach().to("cpu", torch.float16).contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]
