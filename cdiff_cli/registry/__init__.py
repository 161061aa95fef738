"""The registry: named concept deltas in a folder (`CDIFF_HOME`, else the platform's data folder).

- `manifest`: the typed `Manifest` of an entry, its schema version and the migration of older files;
- `store`: `Registry` and `Entry`: atomic writes, typed reads of manifests, token ownership, content hashes;
- `locks`: per-name shared/exclusive inter-process locks (fcntl, or filelock where there is none);
- `doctor`: `cdiff doctor`: finding and repairing what a crash or a hand edit left.
Dependencies point one way: `doctor` reads the store, the store uses the manifest and the locks.
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
