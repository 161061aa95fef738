"""The base an export was made on (`cdiff_base.json` beside every export), for `cdiff add` without --base."""

from __future__ import annotations

import json
import math
from pathlib import Path

from cdiff_cli.errors import first_line, option_error
from cdiff_cli.formats.names import _BASE_FILE_LIMIT, BASE_FILE


def write_base_record(out_dir, base: dict) -> Path:
    """Write `cdiff_base.json` (the entry's base record: ref, fingerprint, probe) into an export folder."""
    record = {"format": "cdiff-base", "version": 1, **{k: base[k] for k in ("ref", "fingerprint", "probe") if k in base}}
    path = Path(out_dir) / BASE_FILE
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def read_base_record(path) -> dict | None:
    """The base record beside an export (in the folder, or beside the file given), or None when there is none.
    The file comes from elsewhere: it must be a small regular file holding a string ref and fingerprint."""
    p = Path(path)
    file = (p if p.is_dir() else p.parent) / BASE_FILE
    if not file.exists() and not file.is_symlink():
        return None
    if file.is_symlink() or not file.is_file() or file.stat().st_size > _BASE_FILE_LIMIT:
        raise option_error("{file}: not a regular file of a few hundred bytes; remove it or give {base}", "base", file=file)
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise option_error("{file}: unreadable ({why}); remove it or give {base}", "base", file=file, why=first_line(e)) from e
    if not (isinstance(record, dict) and isinstance(record.get("ref"), str) and record["ref"]
            and isinstance(record.get("fingerprint"), str)):
        raise option_error("{file}: does not name a base (a string ref and fingerprint); remove it or give {base}", "base",
                           file=file)
    out = {"ref": record["ref"], "fingerprint": record["fingerprint"]}
    probe = record.get("probe")
    if isinstance(probe, list) and probe and all(type(x) in (int, float) and math.isfinite(x) for x in probe):
        out["probe"] = probe  # else compared by fingerprint alone
    return out

