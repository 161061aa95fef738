"""cdiff add / export: move concepts in and out of the registry in other tools' formats."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from cdiff_cli.cli._app import command
from cdiff_cli.cli._options import Force, ImportBase, Json, NewBase, registry
from cdiff_cli.cli._term import term
from cdiff_cli.defaults import EXPORT_FORMATS

ExportFormat = Enum("ExportFormat", {name: name for name in EXPORT_FORMATS}, type=str)
FORMAT_HELP = "; ".join(f"{name}: {holds}" for name, holds in EXPORT_FORMATS.items()) + "."


@command("add", loads_models=True)
def add_cmd(
    name: Annotated[str, typer.Argument(help="Name of the new entry.")],
    path: Annotated[Path, typer.Argument(help="A diffusers output folder, a reference delta.bin / delta_epoch=*.ckpt, a cdiff export, or a LoRA of cross-attention k/v (a cdiff LoRA export folder, or a .safetensors file with --embedding).")],
    token: Annotated[Optional[list[str]], typer.Option("--token", help="Rename the tokens, in order (repeat for several).", show_default=False)] = None,
    class_word: Annotated[Optional[list[str]], typer.Option("--class", help="Class word of each token, in order (used by merge).", show_default=False)] = None,
    embedding: Annotated[Optional[list[Path]], typer.Option("--embedding", help="Token embedding file (textual-inversion format) for a bare LoRA file; repeat for several tokens.", show_default=False)] = None,
    base: ImportBase = None,
    force: Force = False,
    as_json: Json = False,
):
    """Import an existing Custom Diffusion delta or k/v LoRA (checked against the base; pickles load with weights_only)."""
    from cdiff_cli.transfer import import_entry

    entry = import_entry(registry(), name, path, base=base, tokens=token, classes=class_word, embeddings=embedding,
                         force=force)
    if as_json:
        term.json({"name": entry.name, "id": entry.id, "tokens": entry.tokens, "format": entry.manifest["source"]["format"]})
    else:
        term.ok(f"added {entry.name} ({' '.join(entry.tokens)}) from {entry.manifest['source']['format']} format")


@command("export", loads_models=True)
def export_cmd(
    name: Annotated[str, typer.Argument(help="Concept name.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")],
    fmt: Annotated[ExportFormat, typer.Option("--format", help=FORMAT_HELP)] = ExportFormat.diffusers,
    rank: Annotated[Optional[int], typer.Option("--rank", help="lora: keep this many singular values per layer.", show_default=False)] = None,
    energy: Annotated[Optional[float], typer.Option("--energy", help="lora: keep the fewest singular values holding this share of each layer's update (0-1]. Default: full rank, exact.", show_default=False)] = None,
    base: NewBase = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite files of the same names in the output folder (other files there are left alone).")] = False,
    as_json: Json = False,
):
    """Export a concept for other tools.

    The files are written beside the output folder first and moved in when all are there. An existing file of the same name is refused unless --force; the output folder may not lie inside the registry."""
    from cdiff_cli.transfer import export_entry

    paths, details = export_entry(registry(), name, fmt.value, out, base=base, rank=rank, energy=energy, force=force)
    if as_json:
        term.json({"name": name, "format": fmt.value, "files": [str(p) for p in paths], **details})
    else:
        if details:
            term.info(f"LoRA rank {details['min_rank']}-{details['max_rank']}, {details['bytes'] / 1e6:.1f} MB, "
                      f"largest relative error of a layer {details['max_relative_error']:.2e}")
        for p in paths:
            term.data(str(p))
