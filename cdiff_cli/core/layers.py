"""Which UNet parameters Custom Diffusion trains, and how to read and write them."""

from __future__ import annotations

import hashlib

import torch

MODES = ("kv", "crossattn")
# Baselines for benchmarks (not offered by `cdiff train`): the whole UNet (DreamBooth-like fine-tuning
# with a new token) and the token alone (textual inversion).
BASELINE_MODES = ("full", "token")
_KV = ("attn2.to_k.weight", "attn2.to_v.weight")
_QOUT = ("attn2.to_q.weight", "attn2.to_out.0.weight", "attn2.to_out.0.bias")


def trainable_names(unet: torch.nn.Module, mode: str = "kv") -> list[str]:
    """Names of the cross-attention parameters trained in `mode` ("kv" or "crossattn")."""
    if mode == "full":
        return [n for n, _ in unet.named_parameters()]
    if mode == "token":
        return []
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES + BASELINE_MODES}, not {mode!r}")
    suffixes = _KV + (_QOUT if mode == "crossattn" else ())
    return [n for n, _ in unet.named_parameters() if n.endswith(suffixes)]


def mode_suffixes(mode: str) -> tuple[str, ...]:
    """The parameter-name endings a registry delta of `mode` ("kv" or "crossattn") may hold."""
    return _KV + (_QOUT if mode == "crossattn" else ())


def is_kv(name: str) -> bool:
    """A cross-attention key or value weight (what Custom Diffusion trains and the merge constrains)."""
    return name.endswith(_KV)


def kv_names(names) -> list[str]:
    return [n for n in names if is_kv(n)]


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


def base_probe(unet: torch.nn.Module) -> list[float]:
    """Per k/v layer: RMS and two fixed random-sign projections (scaled by 1/sqrt(n)), in float64.

    These statistics barely move when the same base is loaded in fp32, fp16 or bf16 (rounding errors
    average out), but any real change of the weights moves them: see `same_base_probe`.
    """
    params = dict(unet.named_parameters())
    out: list[float] = []
    for name in sorted(kv_names(params)):
        w = params[name].detach().to("cpu", torch.float64).flatten()
        g = torch.Generator().manual_seed(1234)
        signs = torch.randint(0, 2, (2, w.numel()), generator=g, dtype=torch.int8).to(torch.float64) * 2 - 1
        n = w.numel() ** 0.5
        out += [float(w.pow(2).mean().sqrt()), float(signs[0] @ w) / n, float(signs[1] @ w) / n]
    return out


def same_base_probe(a: list[float], b: list[float], rms_tol: float = 5e-4, proj_tol: float = 5e-3, proj_cap: float = 2.5e-2) -> bool:
    """Same base? bf16 keeps 8 significant bits, so rounding moves each weight by up to 2^-8 of itself:
    a layer's RMS by ~1e-4 and each random-sign projection by ~1.6e-3 of the RMS (independent of the
    layer size). Single projections therefore sit 3 sigma from 5e-3 often enough across 30-100 layers
    to trip it, so the projections are judged together: their RMS deviation (in units of each layer's
    RMS) must stay under `proj_tol`, and no single one may exceed `proj_cap`. A real change (another
    fine-tune, a rescale, weights moved by 1 % in one direction) moves them far more."""
    if len(a) != len(b) or not a:
        return False
    deviations = []
    for i in range(0, len(a), 3):
        rms = max(abs(a[i]), 1e-12)
        if abs(a[i] - b[i]) > rms_tol * rms:
            return False
        deviations += [abs(a[i + k] - b[i + k]) / rms for k in (1, 2)]
    if max(deviations) > proj_cap:
        return False
    return (sum(d * d for d in deviations) / len(deviations)) ** 0.5 <= proj_tol


def fingerprint(unet: torch.nn.Module, probe: list[float] | None = None) -> str:
    """A short id of the base's cross-attention k/v weights (for display and cache keys)."""
    probe = probe if probe is not None else base_probe(unet)
    h = hashlib.sha256(" ".join(f"{v:.3g}" for v in probe).encode())
    return h.hexdigest()[:16]
