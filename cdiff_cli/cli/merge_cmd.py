"""cdiff merge: combine concepts with the closed-form constrained merge."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cdiff_cli.cli._app import command
from cdiff_cli.cli._options import Base, Force, Json, registry
from cdiff_cli.cli._term import term
from cdiff_cli.defaults import DEFAULT_RIDGE


@command("merge", loads_models=True)
def merge_cmd(
    names: Annotated[list[str], typer.Argument(help="Concept names: two or more to compose, or one to constrain.")],
    name: Annotated[Optional[str], typer.Option("--name", help="Name of the merged entry. Default: A+B (one concept: A-constrained).", show_default=False)] = None,
    ridge: Annotated[float, typer.Option(help="Relative ridge added to the caption Gram matrix (trace/d units) for a stable solve; a positive number.")] = DEFAULT_RIDGE,
    base: Base = None,
    force: Force = False,
    as_json: Json = False,
):
    """Merge concepts into one entry that keeps every concept's token.

    Each k/v layer is the closest matrix to the base on ordinary captions (the 1,353 shipped ones; on a nano-world base, 1,000 of the world's own) that still maps every concept's own prompt features exactly as that concept's fine-tuned layer does.

    Given one concept, the same solve constrains it: its own prompts keep their trained outputs and prompts without its token come back near the base (less drift on ordinary captions, a little less presence in new contexts).
    """
    from cdiff_cli.merging.entries import merge_entries

    entry, notes = merge_entries(registry(), names, name, base=base, ridge=ridge, force=force, progress=term.progress())
    for n in notes:
        term.warn(n)
    if as_json:
        term.json({"name": entry.name, "id": entry.id, "tokens": entry.tokens, "parents": names, "path": str(entry.path)})
    else:
        verb = "merged" if len(names) > 1 else "constrained"
        term.ok(f"{verb} {', '.join(names)} into {entry.name} (tokens {' '.join(entry.tokens)})")
