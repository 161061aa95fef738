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
from cdiff_cli.defaults import DEFAULT_COMPRESS_ENERGY
from cdiff_cli.errors import CdiffError
from cdiff_cli.merging.captions import captions_for
from cdiff_cli.progress import SILENT, Progress
from cdiff_cli.registry import Entry, Registry
from cdiff_cli.transfer import check_rank_energy, load_entry_base


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


# -- compressing a registry entry ------------------------------------------------------------------

FIDELITY_CAPTIONS = 256  # ordinary captions whose k/v outputs measure the compression error


def compress_entry(
    registry: Registry,
    name: str,
    *,
    rank: int | None = None,
    energy: float | None = None,
    base: str | None = None,
    progress: Progress = SILENT,
) -> tuple[Entry, dict]:
    """Rewrite an entry with its k/v updates as low-rank factors (atomically, in place); returns the
    entry and a report: sizes, ranks, and the largest change of any k/v layer's output on captions."""
    from cdiff_cli.merging import prompt_features

    check_rank_energy(rank, energy)
    if rank is None and energy is None:
        energy = DEFAULT_COMPRESS_ENERGY
    entry = registry.get(name)
    if entry.compressed:
        raise CdiffError(f"concept {name!r} is already compressed")
    spec, pipe = load_entry_base(entry, base)
    progress.note(f"factorising the k/v updates of {name}")
    delta = entry.load_delta(pipe.unet)
    base_w = {n: p for n, p in pipe.unet.named_parameters() if n in delta.weights}
    low = compress_delta(delta, base_w, rank=rank, energy=energy)
    with torch.no_grad():
        X = torch.cat(prompt_features(pipe, list(captions_for(spec.ref))[:FIDELITY_CAPTIONS]))
    r = ranks(low)
    report = {
        "rank": rank,
        "energy": energy,
        "min_rank": min(r, default=0),
        "max_rank": max(r, default=0),
        "bytes_before": int(entry.manifest.get("size_bytes") or entry.delta_path.stat().st_size),
        "bytes_after": stored_bytes(low),
        "captions": FIDELITY_CAPTIONS,
        **output_fidelity(delta, low.expanded(base_w), X),
    }
    keep = entry.info.with_fields(metrics=None, storage="lowrank", compression=report)  # the registry fills the rest
    with registry.lock(name):  # replace exactly the version that was compressed, not one written meanwhile
        if registry.get(name).manifest.get("content_hash") != entry.manifest.get("content_hash"):
            raise CdiffError(f"concept {name!r} was replaced while it was being compressed; run it again")
        new = registry.create(name, low, keep, overwrite=True)
        report["bytes_after"] = int(new.manifest["size_bytes"])  # the file as written, header included
        registry.update_manifest(name, compression=report)  # still under the lock: this very version
    return registry.get(name), report
