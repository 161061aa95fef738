"""cdiff compress: store a concept's k/v updates as low-rank factors."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cdiff_cli.cli._app import command
from cdiff_cli.cli._options import Base, Json, registry
from cdiff_cli.cli._term import term
from cdiff_cli.defaults import DEFAULT_COMPRESS_ENERGY


@command("compress", loads_models=True)
def compress_cmd(
    name: Annotated[str, typer.Argument(help="Concept name.")],
    rank: Annotated[Optional[int], typer.Option("--rank", help="Keep this many singular values per layer.", show_default=False)] = None,
    energy: Annotated[Optional[float], typer.Option("--energy", help=f"Keep the fewest singular values holding this share of each layer's update (0-1]. Default: {DEFAULT_COMPRESS_ENERGY}.", show_default=False)] = None,
    base: Base = None,
    as_json: Json = False,
):
    """Store a concept's k/v updates (W - W0) as low-rank factors: a fraction of the size; loading expands them against the base.

    The entry is rewritten in place (atomically). The report gives the sizes, the ranks kept, and the largest change of any k/v layer's output on 256 ordinary captions. Keep a full copy first with `cdiff export NAME --format cdiff -o DIR` if you may want it back.
    """
    from cdiff_cli.compression import compress_entry

    entry, report = compress_entry(registry(), name, rank=rank, energy=energy, base=base, progress=term.progress())
    if as_json:
        term.json({"name": entry.name, "id": entry.id, **report})
    else:
        term.ok(f"compressed {entry.name}: {report['bytes_before'] / 1e6:.2f} MB -> {report['bytes_after'] / 1e6:.2f} MB "
                f"(rank {report['min_rank']}-{report['max_rank']}); largest k/v output change on captions "
                f"{report['max_output_diff']:.2e} ({100 * report['max_relative_output_diff']:.2f} % of the layer's largest output)")
