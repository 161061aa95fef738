"""Low-rank factorisation of weight updates (pure functions, used by LoRA export and compression).

A Custom Diffusion update W - W0 of a k/v layer only has to act on the directions of the text features
that the new token (and its class) produce, so most of its energy sits in a few singular values.
"""

from __future__ import annotations

import torch


def choose_rank(singular_values: torch.Tensor, rank: int | None = None, energy: float | None = None) -> int:
    """The rank to keep: `rank` (capped at the full rank), or the smallest one whose singular values hold
    at least `energy` (0 < energy <= 1) of the squared Frobenius norm. Exactly one of them must be given."""
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    full = int(singular_values.numel())
    if rank is not None:
        if rank < 1:
            raise ValueError(f"rank must be at least 1, not {rank}")
        return min(rank, full)
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], not {energy}")
    power = singular_values.double().pow(2)
    total = float(power.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(power, 0) / total
    # The first index reaching the target (a small tolerance so energy=1 keeps exactly the full rank).
    return min(full, int((kept < energy - 1e-12).sum()) + 1)


def factorize(update: torch.Tensor, rank: int | None = None, energy: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """update ~= up @ down with up [out, r], down [r, in] (float32), the best rank-r approximation in the
    Frobenius norm (truncated SVD). The singular values are split evenly between the factors (sqrt on
    each side), which keeps both in the same numeric range for fp16 storage."""
    if update.ndim != 2:
        raise ValueError(f"a 2-D weight update is needed, not shape {tuple(update.shape)}")
    u, s, vh = torch.linalg.svd(update.detach().to(torch.float64), full_matrices=False)
    r = choose_rank(s, rank, energy)
    root = s[:r].sqrt()
    return (u[:, :r] * root).float().contiguous(), (root[:, None] * vh[:r]).float().contiguous()


def relative_error(update: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """||update - up @ down||_F / ||update||_F (0 for an exact factorisation)."""
    update = update.detach().double()
    norm = float(update.norm())
    return float((update - up.double() @ down.double()).norm()) / norm if norm else 0.0
