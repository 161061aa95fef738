"""Registry verbs: list, show, rm, path."""

from __future__ import annotations

from typing import Annotated

import typer

from cdiff_cli.cli._app import command
from cdiff_cli.cli._options import Json, registry
from cdiff_cli.cli._term import term
from cdiff_cli.registry import Entry


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def summary(e: Entry) -> dict:
    m = e.manifest
    return {
        "name": e.name,
        "id": e.id,
        "kind": e.kind,
        "tokens": e.tokens,
        "classes": e.classes,
        "base": e.base.get("ref"),
        "base_fingerprint": e.base.get("fingerprint"),
        "mode": e.mode,
        "size_bytes": e.size_bytes,
        "storage": "lowrank" if e.compressed else "full",
        "created": e.created,
        "parents": e.parents,
        "metrics": m.get("metrics") if isinstance(m.get("metrics"), dict) else None,
    }


@command("list")
def list_cmd(as_json: Json = False):
    """List the concepts in the registry."""
    entries = registry().entries()
    if as_json:
        term.json([summary(e) for e in entries])
        return
    if not entries:
        term.info("no concepts yet: train one with `cdiff train NAME IMAGES_DIR --class WORD`")
        return
    rows = [
        [e.name, e.id, str(e.base.get("ref", "")), " ".join(e.tokens), human_size(e.size_bytes),
         e.created[:19].replace("T", " ")]
        for e in entries
    ]
    columns = ["NAME", "ID", "BASE", "TOKENS", "SIZE", "CREATED"]
    if any(isinstance(e.manifest.get("metrics"), dict) for e in entries):
        # Scores from `cdiff eval`: text alignment (CLIPScore) and image alignment (CLIP), '-' if never evaluated.
        columns += ["TEXT", "IMAGE"]
        for e, row in zip(entries, rows):
            m = e.manifest.get("metrics") if isinstance(e.manifest.get("metrics"), dict) else {}
            row += [_score(m.get("text_alignment")), _score(m.get("image_alignment"))]
    term.table(columns, rows)


def _score(x, signed: bool = False) -> str:
    if not isinstance(x, (int, float)):
        return "-"
    x = x if round(x, 3) != 0 else 0.0  # no "-0.000"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def metrics_lines(m: dict) -> list[tuple[str, str]]:
    """`cdiff show` rows for the scores `cdiff eval` stored in a manifest."""
    base, delta = m.get("baseline") or {}, m.get("delta") or {}
    lines = [("text alignment", f"{_score(m.get('text_alignment'))} (base {_score(base.get('text_alignment'))}, "
                                f"delta {_score(delta.get('text_alignment'), True)})"),
             ("image alignment", f"{_score(m.get('image_alignment'))} (CLIP; base {_score(base.get('image_alignment'))}, "
                                 f"delta {_score(delta.get('image_alignment'), True)})")]
    if m.get("image_alignment_dino") is not None:
        lines.append(("image alignment", f"{_score(m.get('image_alignment_dino'))} (DINO; base "
                                         f"{_score(base.get('image_alignment_dino'))}, delta {_score(delta.get('image_alignment_dino'), True)})"))
    for c in m.get("per_concept") or []:
        if len(m.get("per_concept") or []) > 1:
            lines.append((f"  {c.get('token')}", f"image alignment {_score(c.get('image_alignment'))} CLIP"
                                                 + (f", {_score(c.get('image_alignment_dino'))} DINO" if c.get("image_alignment_dino") is not None else "")))
    kid = m.get("kid")
    lines.append(("forgetting", f"KID x1000 {kid:.2f} (CLIP features)" if isinstance(kid, (int, float)) else "not measured"))
    world = m.get("world") if isinstance(m.get("world"), dict) else {}
    for i, sentence in enumerate(world.get("sentences") or []):  # a nano-world base: what the oracle read
        lines.append(("pictures" if i == 0 else "", str(sentence)))
    s, models = m.get("settings") or {}, m.get("models") or {}
    lines.append(("evaluated", f"{str(m.get('date', ''))[:19].replace('T', ' ')}: {m.get('prompts')} prompts ({m.get('prompt_set')}), "
                               f"{s.get('n')} image(s) each, {s.get('steps')} steps, guidance {s.get('guidance')}, seed {s.get('seed')}; "
                               f"CLIP {models.get('clip')}" + (f", DINO {models['dino']}" if models.get("dino") else "")))
    if m.get("report"):
        lines.append(("report", str(m["report"])))
    return lines


@command("show")
def show_cmd(name: Annotated[str, typer.Argument(help="Concept name.")], as_json: Json = False):
    """Show one concept's manifest: tokens, classes, base, training arguments, parents."""
    e = registry().get(name)
    if as_json:
        term.json(e.manifest)
        return
    m = e.manifest
    lines = [
        ("name", e.name), ("id", e.id), ("kind", e.kind), ("tokens", " ".join(e.tokens)),
        ("classes", " ".join(e.classes)), ("mode", e.mode),
        ("base", f"{e.base.get('ref')} (fingerprint {e.base.get('fingerprint')})"),
        ("size", human_size(e.size_bytes)), ("created", e.created),
        ("path", str(e.path)),
    ]
    if e.parents:
        lines.append(("parents", ", ".join(e.parents)))
    # The optional sections read nested fields: a hand-edited one is named, not a traceback.
    for field, section in (("train", _training_lines), ("samples", _samples_lines), ("compression", _compression_lines),
                           ("source", _source_lines), ("metrics", metrics_lines)):
        if m.get(field):
            try:
                lines += section(m[field]) if field != "samples" else section(e)
            except (KeyError, TypeError, AttributeError, ValueError):
                lines.append((field, "unreadable (the manifest was changed by hand? see `cdiff doctor`)"))
    term.table(["FIELD", "VALUE"], [[k, str(v)] for k, v in lines])


def _training_lines(t: dict) -> list[tuple[str, str]]:
    return [("training", f"{t.get('steps')} steps, batch {t.get('batch_size')}, lr {t.get('effective_lr')}, "
                         f"{t.get('resolution')} px, regularisation {t.get('regularisation', {}).get('kind')}")]


def _samples_lines(e: Entry) -> list[tuple[str, str]]:
    if not e.samples_path:
        return []
    smp = e.manifest["samples"]
    return [("samples", f"{e.samples_path} (end of training; {len(smp.get('prompts') or [])} prompt(s) x "
                        f"{len(smp.get('seeds') or [])} seeds)")]


def _compression_lines(c: dict) -> list[tuple[str, str]]:
    return [("compressed", f"low-rank, rank {c['min_rank']}-{c['max_rank']} ({human_size(c['bytes_before'])} before); "
                           f"largest k/v output change on captions {100 * c['max_relative_output_diff']:.2f} %")]


def _source_lines(src: dict) -> list[tuple[str, str]]:
    return [("imported from", f"{src['path']} ({src['format']})")]


@command("rm")
def rm_cmd(
    names: Annotated[list[str], typer.Argument(help="Concept name(s).")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
):
    """Remove concepts from the registry."""
    reg = registry()
    names = list(dict.fromkeys(names))  # `rm a a` removes a once
    entries = [reg.get(n) for n in names]  # all must exist before anything is removed
    if not yes:
        if not typer.confirm(f"Remove {', '.join(e.name for e in entries)}?", err=True):
            raise typer.Exit(1)
    for e in entries:
        reg.remove(e.name)
        term.ok(f"removed {e.name}")


@command("path")
def path_cmd(name: Annotated[str, typer.Argument(help="Concept name; omit for the registry home.")] = ""):
    """Print the registry home, or one concept's folder."""
    reg = registry()
    term.data(str(reg.get(name).path if name else reg.home))
