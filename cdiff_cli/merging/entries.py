"""Merging registry entries: what `cdiff merge` runs around the closed-form merge of `merging.closed_form`."""

from __future__ import annotations

import math

from cdiff_cli.core.tokens import shared_token
from cdiff_cli.errors import CdiffError, already_exists, option_error
from cdiff_cli.merging.captions import captions_for
from cdiff_cli.models.base import load_base
from cdiff_cli.progress import SILENT, Progress
from cdiff_cli.registry import (
    Entry,
    Registry,
    base_record,
    check_same_base,
    validate_name,
)
from cdiff_cli.registry import manifest as manifests
from cdiff_cli.registry.manifest import Parent


def _gram(registry: Registry, pipe, fp: str, captions: tuple[str, ...]):
    from cdiff_cli.merging import regulariser_gram

    return regulariser_gram(pipe, list(captions), registry.writable_cache_dir("gram"), fp)


def merge_loaded(registry, pipe, fp, entries: list[Entry], ridge: float, progress: Progress,
                 captions: tuple[str, ...]):
    """`captions`: the regulariser's ordinary captions for this base (`captions_for`)."""
    from cdiff_cli.merging import merge_deltas

    G = _gram(registry, pipe, fp, captions)
    deltas = [e.load_delta(pipe.unet) for e in entries]
    classes = [e.classes or ["" for _ in e.tokens] for e in entries]
    return merge_deltas(pipe, deltas, classes, G=G, ridge=ridge, captions=[e.captions for e in entries],
                        progress=progress)


CONSTRAINED_SUFFIX = "-constrained"  # the default name of one concept merged alone


def merge_entries(
    registry: Registry,
    names: list[str],
    out_name: str | None = None,
    *,
    base: str | None = None,
    ridge: float | None = None,
    device: str | None = "cpu",
    force: bool = False,
    progress: Progress = SILENT,
) -> tuple[Entry, list[str]]:
    """Merge the entries `names` into a new entry. One entry alone is constrained: its outputs on its own
    prompts stay the trained ones and everything else is held as near the base as that allows, which removes
    most of its drift on ordinary captions (docs/nano-world.md measures it)."""
    from cdiff_cli.merging import DEFAULT_RIDGE

    if not names:
        raise CdiffError("give at least one concept to merge")
    if len(set(names)) != len(names):
        raise CdiffError("each concept may be named only once")
    if ridge is not None and not (math.isfinite(ridge) and ridge > 0):
        raise option_error("{ridge} must be a positive number, not {value}", "ridge", value=ridge)
    if out_name is None:  # --name "" is refused, not the default
        out_name = "+".join(names) if len(names) > 1 else f"{names[0]}{CONSTRAINED_SUFFIX}"
    validate_name(out_name)
    if registry.exists(out_name) and not force:
        raise already_exists(out_name)
    entries = [registry.get(n) for n in names]
    check_same_base(entries)
    check_token_collisions(entries)
    spec, pipe, _ = load_base(base or entries[0].base.get("ref"), device)
    base_rec = base_record(spec.ref, pipe.unet)
    fp = base_rec["fingerprint"]
    check_same_base(entries, base_rec)
    ridge = DEFAULT_RIDGE if ridge is None else ridge
    regulariser = captions_for(spec.ref)
    delta, notes = merge_loaded(registry, pipe, fp, entries, ridge, progress, regulariser)
    manifest = manifests.merged(
        classes=[c for e in entries for c in (e.classes or ["" for _ in e.tokens])],
        captions=[c for e in entries for c in e.captions],
        base=base_rec,
        merge={"method": "closed-form", "ridge": ridge, "regulariser_captions": len(regulariser)},
        parents=[Parent(e.name, e.id) for e in entries],
    )
    return registry.create(out_name, delta, manifest, overwrite=force), notes


def check_token_collisions(entries: list[Entry]) -> None:
    if shared := shared_token([e.tokens for e in entries]):
        t, first, again = shared
        raise CdiffError(f"token {t!r} is used by both {entries[first].name!r} and {entries[again].name!r}")
