"""cdiff add / export: move concepts in and out of the registry in other tools' formats."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from cdiff_cli.cli._app import command
from cdiff_cli.cli._options import Force, Json, NewBase, registry
from cdiff_cli.cli._term import term


class ExportFormat(str, Enum):
    diffusers = "diffusers"
    reference = "reference"
    cdiff = "cdiff"


@command("add")
def add_cmd(
    name: Annotated[str, typer.Argument(help="Name of the new entry.")],
    path: Annotated[Path, typer.Argument(help="A diffusers output folder, a reference delta.bin / delta_epoch=*.ckpt, or a cdiff export.")],
    token: Annotated[Optional[list[str]], typer.Option("--token", help="Rename the tokens, in order (repeat for several).", show_default=False)] = None,
    class_word: Annotated[Optional[list[str]], typer.Option("--class", help="Class word of each token, in order (used by merge).", show_default=False)] = None,
    base: NewBase = None,
    force: Force = False,
    as_json: Json = False,
):
    """Import an existing Custom Diffusion delta (checked against the base; pickles load with weights_only)."""
    from cdiff_cli.workflows import import_entry

    entry = import_entry(registry(), name, path, base=base, tokens=token, classes=class_word, force=force)
    if as_json:
        term.json({"name": entry.name, "id": entry.id, "tokens": entry.tokens, "format": entry.manifest["source"]["format"]})
    else:
        term.ok(f"added {entry.name} ({' '.join(entry.tokens)}) from {entry.manifest['source']['format']} format")


@command("export")
def export_cmd(
    name: Annotated[str, typer.Argument(help="Concept name.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")],
    fmt: Annotated[ExportFormat, typer.Option("--format", help="diffusers: pytorch_custom_diffusion_weights.safetensors + <token>.safetensors; reference: delta.bin; cdiff: delta.safetensors + manifest.json.")] = ExportFormat.diffusers,
    as_json: Json = False,
):
    """Export a concept for other tools."""
    from cdiff_cli.workflows import export_entry

    paths = export_entry(registry(), name, fmt.value, out)
    if as_json:
        term.json({"name": name, "format": fmt.value, "files": [str(p) for p in paths]})
    else:
        for p in paths:
            term.data(str(p))
