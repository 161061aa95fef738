"""The contract of an entry's `manifest.json`: a typed `Manifest`, its schema version, and the migration of
older files.

What a command records is a `Manifest` (`trained`, `merged`, `imported`), never a dict built by hand; the
registry fills in what it measures when it writes the entry (name, id, tokens, mode, size, content hash,
time, versions). Reading is lenient: a field of the wrong type reads as its neutral value, so that a
hand-edited manifest cannot make `cdiff list` fail for the whole registry (`cdiff doctor` names what is
wrong), and fields this version does not know are kept as they are (`extra`) and written back unchanged.

Schema versions (the `schema` field):
  1  the files written before the field existed (cdiff 0.1.0 up to 2026-12-05);
  2  `schema` is written; every entry states `kind`, `classes` and `captions` (one per token), and `parents`
     is a list of {"name", "id"} records.
`migrate` brings a manifest of any older schema to the current one, step by step; it is applied to every
manifest the registry reads, and `cdiff doctor --fix` writes the result back.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

SCHEMA = 2
KINDS = ("trained", "merged", "imported")


@dataclass(frozen=True)
class Parent:
    """An entry a merge was made from: its name and the id (content hash prefix) it had then."""

    name: str
    id: str = ""


@dataclass(frozen=True)
class Manifest:
    """An entry's manifest. `Registry.create` fills in the first group and the third; the second is what the
    command that made the entry records; `extra` holds fields written by a newer cdiff, kept as they are."""

    name: str = ""
    id: str = ""
    tokens: list[str] = field(default_factory=list)
    mode: str = ""

    kind: str = "trained"
    classes: list[str] = field(default_factory=list)
    base: dict = field(default_factory=dict)  # `registry.base_record`: ref, fingerprint, probe
    captions: list[list[str]] = field(default_factory=list)  # per token: the photos' own captions
    parents: list[Parent] = field(default_factory=list)
    train: dict | None = None  # the training run's settings and results (`trained`)
    concepts: list[dict] | None = None  # per concept: token, class, photos and their hashes (`trained`)
    merge: dict | None = None  # method and ridge (`merged`)
    source: dict | None = None  # path and format (`imported`)
    samples: dict | None = None  # the grid made at the end of training
    storage: str | None = None  # "lowrank" once compressed
    compression: dict | None = None  # the compression's report
    metrics: dict | None = None  # the last `cdiff eval`'s summary

    size_bytes: int = 0
    content_hash: str = ""
    created: str = ""
    cdiff_version: str = ""
    schema: int = SCHEMA

    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The JSON object written to `manifest.json` (fields that are None are left out)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value is None:
                continue
            out[f.name] = [{"name": p.name, "id": p.id} for p in value] if f.name == "parents" else value
        return {**out, **{k: v for k, v in self.extra.items() if k not in out}}

    @classmethod
    def from_dict(cls, raw: dict) -> Manifest:
        """A manifest read from a file (of any schema up to this one), each field as its type or neutral."""
        m = migrate(raw)
        known = {f.name for f in fields(cls)} - {"extra"}
        tokens = _str_list(m.get("tokens"))
        n = len(tokens)
        kind = m.get("kind")
        size = m.get("size_bytes")
        return cls(
            kind=kind if isinstance(kind, str) else "trained",
            classes=_str_list(m.get("classes")),
            base=_dict(m.get("base")) or {},
            captions=(([_str_list(x) for x in m["captions"]] if isinstance(m.get("captions"), list) else [])
                      + [[] for _ in range(n)])[:n],
            parents=[Parent(p["name"], _str(p.get("id"))) for p in m.get("parents") or []
                     if isinstance(p, dict) and isinstance(p.get("name"), str)] if isinstance(m.get("parents"), list) else [],
            train=_dict(m.get("train")), concepts=m["concepts"] if isinstance(m.get("concepts"), list) else None,
            merge=_dict(m.get("merge")), source=_dict(m.get("source")), samples=_dict(m.get("samples")),
            storage=m["storage"] if isinstance(m.get("storage"), str) else None,
            compression=_dict(m.get("compression")), metrics=_dict(m.get("metrics")),
            name=_str(m.get("name")), id=_str(m.get("id")), tokens=tokens, mode=_str(m.get("mode")),
            size_bytes=size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else 0,
            content_hash=_str(m.get("content_hash")), created=_str(m.get("created")),
            cdiff_version=_str(m.get("cdiff_version")),
            schema=m["schema"] if isinstance(m.get("schema"), int) else SCHEMA,
            extra={k: v for k, v in m.items() if k not in known},
        )

    def with_fields(self, **changes) -> Manifest:
        """A copy with some fields changed (`dataclasses.replace`)."""
        return replace(self, **changes)


def trained(classes: list[str], captions: list[list[str]], base: dict, train: dict, concepts: list[dict],
            samples: dict | None = None) -> Manifest:
    return Manifest(kind="trained", classes=classes, captions=captions, base=base, train=train, concepts=concepts,
                    samples=samples)


def merged(classes: list[str], captions: list[list[str]], base: dict, merge: dict, parents: list[Parent]) -> Manifest:
    return Manifest(kind="merged", classes=classes, captions=captions, base=base, merge=merge, parents=parents)


def imported(classes: list[str], base: dict, source: dict) -> Manifest:
    return Manifest(kind="imported", classes=classes, base=base, source=source)


# -- migrations ---------------------------------------------------------------------------------------


def _v1_to_v2(m: dict) -> dict:
    """Schema 1 -> 2: state the schema; default `kind`; one class and one caption list per token; parents
    as {"name", "id"} records (a bare name is kept as a record with an empty id)."""
    tokens = _str_list(m.get("tokens"))
    out = dict(m)
    out["schema"] = 2
    out.setdefault("kind", "trained")
    classes = m.get("classes")
    if not isinstance(classes, list) or len(classes) != len(tokens):
        known = _str_list(classes)
        out["classes"] = (known + ["" for _ in tokens])[: len(tokens)]
    if not isinstance(m.get("captions"), list):
        out["captions"] = [[] for _ in tokens]
    if isinstance(m.get("parents"), list):
        out["parents"] = [{"name": p, "id": ""} if isinstance(p, str) else p for p in m["parents"]]
    else:
        out["parents"] = []
    return out


MIGRATIONS = {1: _v1_to_v2}  # schema N -> N + 1


def schema_of(m: dict) -> int:
    s = m.get("schema", 1)
    return s if isinstance(s, int) and not isinstance(s, bool) and s >= 1 else 1


def migrate(m: dict) -> dict:
    """`m` brought to the current schema (a copy; `m` is not changed). A manifest from a newer cdiff is
    returned as it is: its known fields are read, the rest kept."""
    version = schema_of(m)
    while version < SCHEMA:
        m = MIGRATIONS[version](m)
        version += 1
    return m


def _str(x) -> str:
    return x if isinstance(x, str) else ""


def _str_list(x) -> list[str]:
    return [t for t in x if isinstance(t, str)] if isinstance(x, list) else []


def _dict(x) -> dict | None:
    return x if isinstance(x, dict) else None
