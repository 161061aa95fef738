"""The local registry of named concept deltas.

Layout: `HOME/concepts/NAME/{delta.safetensors, manifest.json}` and `HOME/cache/...` for reusable
work (generated regularisation images, merge Gram matrices, on-the-fly merges). Entries are written
into a temporary folder and renamed into place, so a crash or Ctrl-C never leaves half an entry.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cdiff_cli import __version__
from cdiff_cli.errors import CdiffError, NotFoundError
from cdiff_cli.tokens import canonical

if TYPE_CHECKING:
    from cdiff_cli.delta import Delta

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
DELTA_FILE = "delta.safetensors"
MANIFEST_FILE = "manifest.json"


def default_home() -> Path:
    env = os.environ.get("CDIFF_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("cdiff", appauthor=False))


def validate_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise CdiffError(
            f"invalid name {name!r}: use 1-64 letters, digits, '.', '_', '+' or '-', starting with a letter or digit"
        )
    return name


@dataclass
class Entry:
    name: str
    path: Path
    manifest: dict

    @property
    def tokens(self) -> list[str]:
        return list(self.manifest.get("tokens", []))

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("classes", []))

    @property
    def base(self) -> dict:
        return self.manifest.get("base", {})

    @property
    def id(self) -> str:
        return self.manifest.get("id", "")

    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "trained")

    @property
    def delta_path(self) -> Path:
        return self.path / DELTA_FILE

    @property
    def compressed(self) -> bool:
        return self.manifest.get("storage") == "lowrank"

    def load_delta(self, base_unet=None) -> Delta:
        """The entry's delta; a compressed entry needs its base UNet (with pristine weights) to expand."""
        from cdiff_cli.delta import Delta

        if self.compressed and base_unet is None:
            raise CdiffError(f"concept {self.name!r} is compressed: load its base model to use it")
        return Delta.load(self.delta_path, base_unet)


class Registry:
    def __init__(self, home: str | Path | None = None):
        self.home = Path(home) if home is not None else default_home()
        self.concepts = self.home / "concepts"
        self.cache = self.home / "cache"

    # -- reading -------------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        if not self.concepts.is_dir():
            return []
        out = []
        for d in sorted(self.concepts.iterdir()):
            if d.name.startswith(".") or not (d / MANIFEST_FILE).is_file():
                continue
            try:
                manifest = json.loads((d / MANIFEST_FILE).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue  # a damaged entry is skipped, not fatal for `list`
            out.append(Entry(d.name, d, manifest))
        return out

    def get(self, name: str) -> Entry:
        d = self.concepts / name
        if not NAME_RE.match(name) or not (d / MANIFEST_FILE).is_file():
            known = ", ".join(e.name for e in self.entries()) or "none yet"
            raise NotFoundError(f"no concept named {name!r} (known: {known})")
        try:
            manifest = json.loads((d / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CdiffError(f"the manifest of {name!r} is damaged: {e}") from e
        return Entry(name, d, manifest)

    def exists(self, name: str) -> bool:
        return (self.concepts / name / MANIFEST_FILE).is_file()

    def token_owners(self) -> dict[str, Entry]:
        """Canonical token -> the entry that owns it: its trained/imported entry, else a merge holding it."""
        owners: dict[str, Entry] = {}
        entries = self.entries()
        for e in entries:
            if e.kind != "merged":
                for t in e.tokens:
                    owners.setdefault(canonical(t), e)
        # A merge whose parents were removed still serves its tokens.
        for e in entries:
            if e.kind == "merged":
                for t in e.tokens:
                    owners.setdefault(canonical(t), e)
        return owners

    def check_tokens_free(self, tokens: list[str], *, replacing: str | None = None) -> None:
        owners = self.token_owners()
        for t in tokens:
            owner = owners.get(canonical(t))
            if owner is not None and owner.name != replacing and owner.kind != "merged":
                raise CdiffError(f"token {t!r} is already used by concept {owner.name!r}; pick another with --token")

    # -- writing -------------------------------------------------------------------------------
    def create(self, name: str, delta: Delta, manifest: dict, *, overwrite: bool = False) -> Entry:
        """Write an entry atomically (temp dir + rename). Fills id, size, content hash, time."""
        validate_name(name)
        final = self.concepts / name
        if final.exists() and not overwrite:
            raise CdiffError(f"concept {name!r} already exists (use --force to replace it)")
        self.concepts.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.concepts))
        try:
            delta.save(tmp / DELTA_FILE)
            digest = hashlib.sha256((tmp / DELTA_FILE).read_bytes()).hexdigest()
            manifest = {
                "name": name,
                "id": digest[:8],
                "tokens": list(delta.tokens),
                "mode": delta.mode,
                **manifest,
                "size_bytes": (tmp / DELTA_FILE).stat().st_size,
                "content_hash": "sha256:" + digest,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "cdiff_version": __version__,
            }
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            if final.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=self.concepts))
                os.replace(final, trash / name)
                os.replace(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Entry(name, final, manifest)

    def update_manifest(self, name: str, **fields) -> Entry:
        entry = self.get(name)
        entry.manifest.update(fields)
        tmp = entry.path / (MANIFEST_FILE + ".tmp")
        tmp.write_text(json.dumps(entry.manifest, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, entry.path / MANIFEST_FILE)
        return entry

    def remove(self, name: str) -> None:
        entry = self.get(name)
        trash = Path(tempfile.mkdtemp(prefix=f".rm-{name}-", dir=self.concepts))
        os.replace(entry.path, trash / name)
        shutil.rmtree(trash, ignore_errors=True)

    def cache_dir(self, *parts: str) -> Path:
        d = self.cache.joinpath(*parts)
        d.mkdir(parents=True, exist_ok=True)
        return d


def base_record(spec_ref: str, unet) -> dict:
    """What an entry remembers of its base: where it came from, an id, and the probe used to compare."""
    from cdiff_cli.layers import base_probe, fingerprint

    probe = base_probe(unet)
    return {"ref": spec_ref, "fingerprint": fingerprint(unet, probe), "probe": probe}


def _same(a: dict, b: dict) -> bool:
    from cdiff_cli.layers import same_base_probe

    if a.get("probe") and b.get("probe"):
        return same_base_probe(a["probe"], b["probe"])
    return a.get("fingerprint") == b.get("fingerprint")


def check_same_base(entries: list[Entry], base: dict | None = None) -> None:
    """Refuse entries trained on different bases (or on a base other than `base`, a base_record)."""
    for e in entries[1:]:
        if not _same(entries[0].base, e.base):
            desc = ", ".join(f"{x.name} ({x.base.get('ref')})" for x in entries)
            raise CdiffError(f"these concepts were trained on different base models: {desc}")
    if base is not None and entries and not _same(entries[0].base, base):
        e = entries[0]
        raise CdiffError(
            f"concept {e.name!r} belongs to base {e.base.get('ref')} (fingerprint {e.base.get('fingerprint')}), "
            f"not to the base given, {base.get('ref')} (fingerprint {base.get('fingerprint')})"
        )
