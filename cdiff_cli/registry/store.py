"""The local registry of named concept deltas.

Layout: `HOME/concepts/NAME/{delta.safetensors, manifest.json}` and `HOME/cache/...` for reusable
work (generated regularisation images, merge Gram matrices, on-the-fly merges). Entries are written
into a temporary folder and renamed into place, so a crash or Ctrl-C never leaves half an entry.

Concurrency: every name has an inter-process lock in `HOME/locks/` (see `cdiff_cli.registry.locks`). Writes
(`create`, `update_manifest`, `remove`) take it exclusively, waiting up to WRITE_WAIT seconds; reading a
delta for use (`Entry.load_delta`, `Registry.reading`) takes it shared, so a reader sees a whole entry or
none, never one being replaced or removed. `Registry.hold(name)` takes it exclusively without waiting,
for a whole training run; writes inside it are reentrant. A busy name raises BusyError (exit code 3).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from cdiff_cli import __version__
from cdiff_cli.core.tokens import canonical
from cdiff_cli.errors import CdiffError, NotFoundError, already_exists, option_error, reason
from cdiff_cli.files import share_as_umask
from cdiff_cli.hashing import file_sha256
from cdiff_cli.registry import locks
from cdiff_cli.registry.manifest import SCHEMA, Manifest, migrate

if TYPE_CHECKING:
    from cdiff_cli.core.delta import Delta

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
DELTA_FILE = "delta.safetensors"
MANIFEST_FILE = "manifest.json"
SAMPLES_FILE = "samples.png"  # samples.GRID_FILE (not imported: the registry loads without torch)
WRITE_WAIT = 30.0  # seconds a write waits for a busy name before BusyError
READ_WAIT = 30.0  # seconds a read waits for a name being written


def default_home() -> Path:
    env = os.environ.get("CDIFF_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("cdiff", appauthor=False))


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise CdiffError(
            f"invalid name {name!r}: use 1-64 letters, digits, '.', '_', '+' or '-', starting with a letter or digit"
        )
    return name


def read_manifest(path: Path) -> dict:
    """The manifest at `path` as written (any schema); FileNotFoundError if it is gone, ValueError if it is
    not a JSON object."""
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except RecursionError as e:
        raise ValueError("nested too deeply") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"expected a JSON object, got {type(manifest).__name__}")
    return manifest


def check_delta_file(entry: Entry) -> None:
    """The delta file is a regular file of the entry's own (never a link followed out of the registry) and the
    one the manifest was written for (a swapped or damaged file is refused)."""
    if entry.delta_path.is_symlink() or not entry.delta_path.is_file():
        raise CdiffError(f"concept {entry.name!r}: {DELTA_FILE} is not a regular file (a link?); see `cdiff doctor`")
    want = entry.manifest.get("content_hash")
    if isinstance(want, str) and want.startswith("sha256:") and "sha256:" + file_sha256(entry.delta_path) != want:
        raise CdiffError(f"concept {entry.name!r}: {DELTA_FILE} does not match the manifest's content_hash (changed "
                         "or damaged since it was written; see `cdiff doctor`)")


@dataclass
class Entry:
    """One concept in the registry. `manifest` is its manifest.json brought to the current schema (a plain
    dict, as `cdiff show --json` prints it); `info` is the same as a typed `Manifest`; the properties below
    read single fields leniently."""

    name: str
    path: Path
    manifest: dict
    registry: Registry | None = field(default=None, repr=False, compare=False)

    @cached_property
    def info(self) -> Manifest:
        """The manifest, typed. Every field is read as its type or a neutral value: a hand-edited manifest must
        not make `list` fail for the whole registry (`doctor` names what is wrong with it)."""
        return Manifest.from_dict(self.manifest)

    @property
    def tokens(self) -> list[str]:
        return self.info.tokens

    @property
    def classes(self) -> list[str]:
        return self.info.classes

    @property
    def captions(self) -> list[list[str]]:
        """Per token, the target images' own captions it was trained on ([] for "photo of a TOKEN CLASS")."""
        return self.info.captions

    @property
    def base(self) -> dict:
        return self.info.base

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def size_bytes(self) -> int:
        return self.info.size_bytes

    @property
    def created(self) -> str:
        return self.info.created

    @property
    def parents(self) -> list[str]:
        """The names of the entries a merge was made from."""
        return [p.name for p in self.info.parents]

    @property
    def mode(self) -> str:
        return self.info.mode

    @property
    def delta_path(self) -> Path:
        return self.path / DELTA_FILE

    @property
    def samples_path(self) -> Path | None:
        """The grid of samples made at the end of training, if the entry keeps one (the name is fixed, never
        read from the manifest)."""
        p = self.path / SAMPLES_FILE
        return p if isinstance(self.manifest.get("samples"), dict) and p.is_file() and not p.is_symlink() else None

    @property
    def compressed(self) -> bool:
        return self.manifest.get("storage") == "lowrank"

    def load_delta(self, base_unet=None) -> Delta:
        """The entry's delta; a compressed entry needs its base UNet (with pristine weights) to expand.

        Read under the entry's shared lock: NotFoundError if it was removed since it was listed,
        CdiffError if it was replaced by different content (the manifest in hand would not match)."""
        from cdiff_cli.core.delta import Delta

        if self.compressed and base_unet is None:
            raise CdiffError(f"concept {self.name!r} is compressed: load its base model to use it")
        from cdiff_cli.core.delta import check_content

        if self.registry is None:
            delta = Delta.load(self.delta_path, base_unet)
        else:
            with self.registry.reading(self.name) as now:
                if now.manifest.get("content_hash") != self.manifest.get("content_hash"):
                    raise CdiffError(f"concept {self.name!r} was replaced while this command ran; run it again")
                delta = Delta.load(now.delta_path, base_unet)  # (a file safetensors cannot read says so first)
                check_delta_file(now)
        check_content(delta, f"concept {self.name!r} is damaged (see `cdiff doctor`)")
        return delta


class Registry:
    def __init__(self, home: str | Path | None = None):
        self.home = Path(home) if home is not None else default_home()
        if self.home.exists() and not self.home.is_dir():
            raise CdiffError(f"the registry home {self.home} is not a folder (set CDIFF_HOME to a folder)")
        self.concepts = self.home / "concepts"
        self.cache = self.home / "cache"
        self.locks = self.home / "locks"
        self.checkpoints = self.home / "checkpoints"  # HOME/checkpoints/NAME: resumable training state
        self.samples = self.home / "samples"  # HOME/samples/NAME: the grids a training run makes
        self.quarantine = self.home / "quarantine"  # damaged entries moved aside by `cdiff doctor --fix`

    # -- reading -------------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        if not self.concepts.is_dir():
            return []
        out = []
        for d in sorted(self.concepts.iterdir()):
            if d.name.startswith(".") or not NAME_RE.fullmatch(d.name):
                continue
            try:
                manifest = read_manifest(d / MANIFEST_FILE)
            except (OSError, ValueError):
                continue  # missing (removed meanwhile, or an orphan) or damaged: skipped, not fatal for `list`
            out.append(Entry(d.name, d, migrate(manifest), self))
        return out

    def get(self, name: str) -> Entry:
        d = self.concepts / name if isinstance(name, str) and NAME_RE.fullmatch(name) else None
        try:
            if d is None or not d.is_dir():
                raise FileNotFoundError(name)
            manifest = read_manifest(d / MANIFEST_FILE)
        except (FileNotFoundError, NotADirectoryError):
            known = ", ".join(e.name for e in self.entries()) or "none yet"
            raise NotFoundError(f"no concept named {name!r} (known: {known})") from None
        except (OSError, ValueError) as e:
            raise CdiffError(f"the manifest of {name!r} is damaged: {e} (see `cdiff doctor`)") from e
        return Entry(name, d, migrate(manifest), self)

    def exists(self, name: str) -> bool:
        return (self.concepts / name / MANIFEST_FILE).is_file()

    # -- locking -------------------------------------------------------------------------------
    def lock_path(self, name: str) -> Path:
        return self.locks / f"{validate_name(name)}.lock"

    @contextmanager
    def lock(self, name: str, *, shared: bool = False, wait: float | None = None) -> Iterator[None]:
        """Hold NAME's inter-process lock (exclusive, or shared for readers) for the `with` block;
        BusyError after `wait` seconds (0: at once; default WRITE_WAIT, or READ_WAIT when shared).
        Reentrant within a process, except that an exclusive request inside a shared one raises
        RuntimeError (see `cdiff_cli.registry.locks`)."""
        if wait is None:
            wait = READ_WAIT if shared else WRITE_WAIT
        with locks.lock(self.lock_path(name), shared=shared, wait=wait, what=f"concept {name!r}"):
            yield

    def tokens_lock(self):
        """The registry-wide lock under which an entry's tokens are checked and the entry put in place."""
        return locks.lock(self.locks / "registry" / "tokens.lock", wait=WRITE_WAIT, what="the registry's tokens")

    def check_outside(self, path: str | Path) -> None:
        """Refuse an output path inside the registry's home: a write there could replace an entry or make a
        fake one (the registry writes its own folders, and only through its own methods)."""
        p, home = Path(path).expanduser().resolve(), self.home.expanduser().resolve()
        if p == home or home in p.parents:
            raise CdiffError(f"{path} is inside the registry ({home}): write the output somewhere else")

    def hold(self, name: str):
        """Exclusive, fail-fast lock on training NAME (its checkpoint and, at the end, its entry): BusyError
        at once if another process is training it. It is a lock of its own, not the entry's: an existing
        entry stays readable (`gen`) while a `--force` retrain runs, until `create` swaps it briefly."""
        return locks.lock(self.train_lock_path(name), wait=0, what=f"concept {name!r}")

    def train_lock_path(self, name: str) -> Path:
        # A folder of its own: `NAME.train.lock` would be the entry lock of a concept named "NAME.train".
        return self.locks / "train" / f"{validate_name(name)}.lock"

    @contextmanager
    def reading(self, name: str, *, wait: float | None = None) -> Iterator[Entry]:
        """The entry, freshly read under its shared lock; it cannot be replaced or removed while the
        `with` block runs. NotFoundError if it does not exist (or was removed meanwhile)."""
        if not (isinstance(name, str) and NAME_RE.fullmatch(name)):
            self.get(name)  # NotFoundError
        with self.lock(name, shared=True, wait=wait):
            yield self.get(name)

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
                raise option_error("token {t} is already used by concept {owner}; pick another with {token}", "token", t=repr(t),
                                   owner=repr(owner.name))

    # -- writing -------------------------------------------------------------------------------
    def create(self, name: str, delta: Delta, manifest: Manifest | dict, *, overwrite: bool = False,
               files: dict[str, Path] | None = None) -> Entry:
        """Write an entry atomically (temp dir + rename). `manifest`: what the command records (a `Manifest`;
        a dict is read as one); the registry fills in name, id, tokens, mode, size, content hash, time and
        versions, and gives each token a class and a caption list. `files`: other files the entry keeps, by
        their name in its folder (the samples grid)."""
        validate_name(name)
        if isinstance(manifest, dict):
            manifest = Manifest.from_dict({"schema": SCHEMA, **manifest})
        with self.lock(name):
            return self._create(name, delta, manifest, overwrite, files or {})

    def _create(self, name: str, delta: Delta, manifest: Manifest, overwrite: bool, files: dict[str, Path]) -> Entry:
        final = self.concepts / name
        if final.exists() and not overwrite:
            raise already_exists(name)
        self.concepts.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.concepts))
        share_as_umask(tmp, folder=True)  # mkdtemp makes it 0700: a webui running as another user could not read it
        trash = None
        try:
            delta.save(tmp / DELTA_FILE)
            for fname, src in files.items():
                shutil.copyfile(src, tmp / fname)
            digest = file_sha256(tmp / DELTA_FILE)
            n = len(delta.tokens)
            manifest = manifest.with_fields(
                name=name, id=digest[:8], tokens=list(delta.tokens), mode=delta.mode,
                classes=(manifest.classes + ["" for _ in range(n)])[:n],
                captions=(manifest.captions + [[] for _ in range(n)])[:n],
                size_bytes=(tmp / DELTA_FILE).stat().st_size, content_hash="sha256:" + digest,
                created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                cdiff_version=__version__, schema=SCHEMA,
            ).to_dict()
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            # Tokens are checked again here, under one lock for the whole registry: two runs of different
            # names given the same token both passed the check when they started.
            with self.tokens_lock():
                if manifest.get("kind") != "merged":  # a merge holds its parents' tokens
                    self.check_tokens_free(list(delta.tokens), replacing=name)
                if final.exists():
                    trash = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=self.concepts))
                    os.replace(final, trash / name)
                    os.replace(tmp, final)
                    shutil.rmtree(trash, ignore_errors=True)
                else:
                    os.replace(tmp, final)
        except BaseException as e:
            if trash is not None and not final.exists() and (trash / name).exists():
                os.replace(trash / name, final)  # stopped between the two renames: the old version stays
                shutil.rmtree(trash, ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, Exception) and not isinstance(e, CdiffError):
                # A full disk, a read-only home (OSError, or safetensors' own error type): one clear line.
                raise CdiffError(f"cannot save concept {name!r}: {reason(e)}") from e
            raise
        return Entry(name, final, manifest, self)

    def update_manifest(self, name: str, **fields) -> Entry:
        self.get(name)  # NotFoundError before any lock file is made
        with self.lock(name):
            entry = self.get(name)
            entry.manifest.update(fields)
            entry.__dict__.pop("info", None)  # read again from the updated manifest
            tmp = entry.path / (MANIFEST_FILE + ".tmp")
            tmp.write_text(json.dumps(entry.manifest, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, entry.path / MANIFEST_FILE)
            return entry

    def remove(self, name: str) -> None:
        self.get(name)
        with self.lock(name):
            entry = self.get(name)
            trash = Path(tempfile.mkdtemp(prefix=f".rm-{name}-", dir=self.concepts))
            os.replace(entry.path, trash / name)
            shutil.rmtree(trash, ignore_errors=True)
            shutil.rmtree(self.samples / name, ignore_errors=True)  # its training's sample grids

    def cache_dir(self, *parts: str) -> Path:
        d = self.cache.joinpath(*parts)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def writable_cache_dir(self, *parts: str) -> Path | None:
        """A cache folder to write into, or None where the registry is read-only (a shared mount): what the
        cache would have kept is then recomputed in memory."""
        try:
            d = self.cache_dir(*parts)
        except OSError:
            return None
        return d if os.access(d, os.W_OK) else None


def base_record(spec_ref: str, unet) -> dict:
    """What an entry remembers of its base: where it came from, an id, and the probe used to compare."""
    from cdiff_cli.core.layers import base_probe, fingerprint

    probe = base_probe(unet)
    return {"ref": spec_ref, "fingerprint": fingerprint(unet, probe), "probe": probe}


def same_base(a: dict, b: dict) -> bool:
    """Are two base records (see `base_record`) the same model?"""
    from cdiff_cli.core.layers import same_base_probe

    if a.get("probe") and b.get("probe"):
        return same_base_probe(a["probe"], b["probe"])
    return a.get("fingerprint") == b.get("fingerprint")


def check_same_base(entries: list[Entry], base: dict | None = None) -> None:
    """Refuse entries trained on different bases (or on a base other than `base`, a base_record)."""
    for e in entries[1:]:
        if not same_base(entries[0].base, e.base):
            desc = ", ".join(f"{x.name} ({x.base.get('ref')})" for x in entries)
            raise CdiffError(f"these concepts were trained on different base models: {desc}")
    if base is not None and entries and not same_base(entries[0].base, base):
        e = entries[0]
        raise CdiffError(
            f"concept {e.name!r} belongs to base {e.base.get('ref')} (fingerprint {e.base.get('fingerprint')}), "
            f"not to the base given, {base.get('ref')} (fingerprint {base.get('fingerprint')})"
        )
