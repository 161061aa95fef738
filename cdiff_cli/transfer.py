"""Moving entries in and out of the registry: `cdiff add` (import_entry) and `cdiff export` (export_entry),
over the pure readers and writers of `cdiff_cli.formats`."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from cdiff_cli.core.delta import check_content
from cdiff_cli.core.tokens import validate_token
from cdiff_cli.defaults import EXPORT_FORMATS
from cdiff_cli.errors import CdiffError, Message, NotFoundError, already_exists, option_error, reason
from cdiff_cli.models.base import load_base
from cdiff_cli.registry import (
    Entry,
    Registry,
    base_record,
    check_delta_file,
    check_same_base,
    same_base,
    validate_name,
)
from cdiff_cli.registry import manifest as manifests


def import_entry(
    registry: Registry,
    name: str,
    path: Path,
    *,
    base: str | None = None,
    tokens: list[str] | None = None,
    classes: list[str] | None = None,
    embeddings: list[Path] | None = None,
    force: bool = False,
) -> Entry:
    from cdiff_cli.formats import check_against_base, detect_format, load_delta_file

    validate_name(name)
    if registry.exists(name) and not force:
        raise already_exists(name)
    if not Path(path).exists():
        raise NotFoundError(f"not found: {path}")
    fmt = detect_format(path)
    spec, pipe = _load_export_base(path, base)
    delta = load_delta_file(path, base_unet=pipe.unet, token_rename=tokens or None, embeddings=embeddings)
    check_content(delta, path)
    check_against_base(delta, pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
    for t in delta.tokens:
        validate_token(t, pipe.tokenizer)
    registry.check_tokens_free(delta.tokens, replacing=name if force else None)
    if classes and len(classes) != len(delta.tokens):
        raise option_error("{classes} was given {n} time(s) but the delta has {m} token(s)", "classes", n=len(classes),
                           m=len(delta.tokens))
    manifest = manifests.imported(classes or ["" for _ in delta.tokens], base_record(spec.ref, pipe.unet),
                                  {"path": str(Path(path).resolve()), "format": fmt})
    return registry.create(name, delta, manifest, overwrite=force)


def _load_export_base(path: Path, base: str | None):
    """(spec, pipeline) for importing `path`: `base`, else the base its export recorded (cdiff_base.json);
    a base that is not the recorded one is refused."""
    from cdiff_cli.formats import BASE_FILE, read_base_record

    recorded = read_base_record(path)
    try:
        spec, pipe, _ = load_base(base or (recorded or {}).get("ref"), "cpu")
    except CdiffError as e:
        if base is None and recorded is not None:  # say where the ref came from, and the way out
            e.add(Message(" (the base named by {file} of the export; give {base} with that model)", "base", file=BASE_FILE))
        raise
    if recorded is not None and not same_base(recorded, rec := base_record(spec.ref, pipe.unet)):
        raise CdiffError(f"{path} was exported from another base model, {recorded['ref']} (fingerprint "
                         f"{recorded['fingerprint']}), not {rec['ref']} (fingerprint {rec['fingerprint']}): give "
                         "--base with the model it was trained on")
    return spec, pipe


def load_entry_base(entry: Entry, base: str | None):
    """(spec, pipeline) of the base an entry was trained on (or `base`, which must be the same model), in fp32
    on the CPU: for work that needs the exact W0 (LoRA differences, low-rank expansion)."""
    spec, pipe, _ = load_base(base or entry.base.get("ref"), "cpu")
    check_same_base([entry], base_record(spec.ref, pipe.unet))
    return spec, pipe


def check_rank_energy(rank: int | None, energy: float | None) -> None:
    if rank is not None and energy is not None:
        raise option_error("give {rank} or {energy}, not both", "rank", "energy")
    if rank is not None and rank < 1:
        raise option_error("{rank} must be at least 1, not {value}", "rank", value=rank)
    if energy is not None and not 0 < energy <= 1:
        raise option_error("{energy} must be in (0, 1], not {value}", "energy", value=energy)


def export_entry(
    registry: Registry,
    name: str,
    fmt: str,
    out_dir: Path,
    *,
    base: str | None = None,
    rank: int | None = None,
    energy: float | None = None,
    force: bool = False,
) -> tuple[list[Path], dict]:
    """Write an entry in another tool's layout; returns (files, details). `rank`/`energy` apply to "lora"
    (default: full rank, exact up to fp16); the LoRA holds W - W0, so the entry's base is loaded. Every
    format gets `cdiff_base.json` beside its files: the base it belongs to, which `cdiff add` reads.

    The files are written into a folder of their own first and moved into `out_dir` only when all are
    there; a file of the same name already in `out_dir` is refused unless `force`, and `out_dir` may not
    lie inside the registry."""
    from cdiff_cli.formats import write_base_record

    entry = registry.get(name)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CdiffError(f"cannot export to {out_dir}: it exists and is not a folder")
    registry.check_outside(out_dir)
    if fmt != "lora" and (rank is not None or energy is not None):
        raise option_error("{rank} and {energy} apply to {format} lora only", "rank", "energy", "format")
    check_rank_energy(rank, energy)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".cdiff-export-", dir=out_dir.parent))
    except OSError as e:
        raise CdiffError(f"cannot export to {out_dir}: {reason(e)}") from e
    try:
        files, details = _export_files(registry, entry, fmt, staging, base, rank, energy)
        if entry.base.get("ref") and entry.base.get("fingerprint"):
            files.append(write_base_record(staging, entry.base))
        return _move_in(staging, [f.relative_to(staging) for f in files], out_dir, force), details
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_in(staging: Path, names: list[Path], out_dir: Path, force: bool) -> list[Path]:
    """Move the staged files into `out_dir`, none of them over an existing file unless `force`."""
    taken = [n for n in names if (out_dir / n).exists() or (out_dir / n).is_symlink()]
    if taken and not force:
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise option_error("{path} already exists{more}: add {force} to overwrite, or choose another {out}", "force", "out",
                           path=out_dir / taken[0], more=more)
    try:
        for n in names:
            (out_dir / n).parent.mkdir(parents=True, exist_ok=True)
            if (out_dir / n).is_dir() and not (out_dir / n).is_symlink():
                raise CdiffError(f"cannot export to {out_dir}: {out_dir / n} is a folder")
            os.replace(staging / n, out_dir / n)
    except OSError as e:
        raise CdiffError(f"cannot export to {out_dir}: {reason(e)}") from e
    return [out_dir / n for n in names]


def _export_files(registry, entry: Entry, fmt: str, out_dir: Path, base, rank, energy) -> tuple[list[Path], dict]:
    from cdiff_cli.formats import export_diffusers, export_reference

    name = entry.name
    if fmt == "cdiff":  # the entry as stored (compressed or not), with its manifest
        out_dir.mkdir(parents=True, exist_ok=True)
        with registry.reading(name) as now:  # delta and manifest of one version, never a partial copy
            check_delta_file(now)
            shutil.copyfile(now.delta_path, out_dir / "delta.safetensors")
            (out_dir / "manifest.json").write_text(json.dumps(now.manifest, indent=2) + "\n", encoding="utf-8")
        return [out_dir / "delta.safetensors", out_dir / "manifest.json"], {}
    pipe = None
    if fmt == "lora" or entry.compressed:  # W0 is needed
        spec, pipe = load_entry_base(entry, base)
    delta = entry.load_delta(pipe.unet if pipe is not None else None)
    if fmt == "diffusers":
        return export_diffusers(delta, out_dir), {}
    if fmt == "reference":
        return export_reference(delta, out_dir), {}
    if fmt == "lora":
        from cdiff_cli.formats.lora import export_lora

        base_weights = {n: p for n, p in pipe.unet.named_parameters() if n in delta.weights}
        meta = {"cdiff_entry": entry.name, "cdiff_base": str(spec.ref),
                "cdiff_base_fingerprint": str(entry.base.get("fingerprint", ""))}
        return export_lora(delta, base_weights, out_dir, entry.name, rank=rank, energy=energy or 1.0, metadata=meta)
    raise CdiffError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
