"""`cdiff compress`: store a concept's k/v updates as low-rank factors, and measure what that costs.

Fidelity is measured where it matters: on the layer outputs for ordinary captions (the text features
that every prompt feeds into k/v), as the largest absolute difference between the full and the compressed
update's outputs, also relative to the largest output of the fine-tuned layer itself.
"""

from __future__ import annotations

import torch

from cdiff_cli.core.delta import Delta, LowRankDelta
from cdiff_cli.core.layers import is_kv
from cdiff_cli.core.lowrank import factorize


def compress_delta(
    delta: Delta,
    base: dict[str, torch.Tensor],
    *,
    rank: int | None = None,
    energy: float | None = None,
    dtype: torch.dtype = torch.float16,
) -> LowRankDelta:
    """Factorise every k/v update W - W0 (rank or energy per layer, see `lowrank.choose_rank`); any other
    trained parameter (crossattn mode) is kept whole."""
    factors, full = {}, {}
    for name, w in delta.weights.items():
        if is_kv(name):
            factors[name] = factorize(w.float() - base[name].detach().to("cpu", torch.float32), rank=rank, energy=energy)
        else:
            full[name] = w
    return LowRankDelta(factors, full, list(delta.tokens), delta.embeddings, delta.mode, dtype, delta.embeddings_2)


@torch.no_grad()
def output_fidelity(full: Delta, approx: Delta, features: torch.Tensor) -> dict[str, float]:
    """Largest |X W^T - X W'^T| over caption features X [n, dim] and every k/v layer, absolute and relative
    to the largest |X W^T| of that layer; also the stored ranks."""
    X = features.float()
    worst_abs, worst_rel = 0.0, 0.0
    for name, w in full.weights.items():
        if not is_kv(name):
            continue
        out = X @ w.float().T
        diff = (out - X @ approx.weights[name].float().T).abs().max().item()
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(out.abs().max().item(), 1e-12))
    return {"max_output_diff": worst_abs, "max_relative_output_diff": worst_rel}


def stored_bytes(d: LowRankDelta) -> int:
    size = torch.tensor([], dtype=d.dtype).element_size()
    n = sum(up.numel() + down.numel() for up, down in d.factors.values()) * size
    n += sum(t.numel() * t.element_size() for t in d.full.values())
    return n + (d.embeddings.numel() + (d.embeddings_2.numel() if d.embeddings_2 is not None else 0)) * 4


def ranks(d: LowRankDelta) -> list[int]:
    return [up.shape[1] for up, _ in d.factors.values()]
