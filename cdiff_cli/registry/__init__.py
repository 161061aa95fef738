"""The registry: named concept deltas in a folder (`CDIFF_HOME`, else the platform's data folder).

- `store`: `Registry` and `Entry`: atomic writes, typed reads of manifests, token ownership, content hashes;
- `locks`: per-name shared/exclusive inter-process locks (fcntl, or filelock where there is none);
- `doctor`: `cdiff doctor`: finding and repairing what a crash or a hand edit left.
Dependencies point down that list (`doctor` reads the store; the store uses the locks).
"""

from __future__ import annotations

from cdiff_cli.registry.store import (
    DELTA_FILE,
    MANIFEST_FILE,
    NAME_RE,
    READ_WAIT,
    SAMPLES_FILE,
    WRITE_WAIT,
    Entry,
    Registry,
    base_record,
    check_delta_file,
    check_same_base,
    default_home,
    read_manifest,
    same_base,
    validate_name,
)

__all__ = ["DELTA_FILE", "MANIFEST_FILE", "NAME_RE", "READ_WAIT", "SAMPLES_FILE", "WRITE_WAIT", "Entry", "Registry",
           "base_record", "check_delta_file", "check_same_base", "default_home", "read_manifest", "same_base",
           "validate_name"]
