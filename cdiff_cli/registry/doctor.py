"""`cdiff doctor`: find what killed writes and hand edits leave in the registry, and repair it.

Checks, per name and under that name's lock (so nothing a live process is writing is touched):

- leftover folders of killed writes in `concepts/` (`.tmp-NAME-*`, `.old-NAME-*`, `.rm-NAME-*`) and a
  stray `manifest.json.tmp` inside an entry: deleted by `--fix`. A write is rolled back, never forward:
  if a killed `--force` write left the previous version only in its `.old-` folder, it is put back;
- entries without `manifest.json` or `delta.safetensors`, a manifest that is not a JSON object or lacks a
  required field, a manifest name other than the folder name, a `delta.safetensors` whose sha256 is not
  the manifest's `content_hash`, or one that safetensors cannot read; files or badly named folders in
  `concepts/`: moved by `--fix` to `quarantine/NAME-<UTC time>/` (user data is never deleted, and nothing
  is re-hashed: a mismatch may be corruption);
- a healthy entry whose manifest an older cdiff wrote (schema below `manifest.SCHEMA`): reported, not a
  problem (it is migrated in memory whenever it is read); `--fix` writes it back migrated;
- training checkpoints in `checkpoints/NAME/` (resumable training): reported, not a problem; deleted
  only by `--fix --discard-checkpoints`. A save killed between its renames is completed by `--fix`.

A name whose lock another process holds (a training run, a write) is reported as busy and not checked.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from cdiff_cli.errors import BusyError, first_line
from cdiff_cli.hashing import file_sha256
from cdiff_cli.registry import DELTA_FILE, MANIFEST_FILE, NAME_RE, Registry, read_manifest
from cdiff_cli.registry.manifest import SCHEMA, migrate, schema_of

LOCK_WAIT = 2.0  # seconds the doctor waits for a name that another process is using
TEMP_RE = re.compile(r"^\.(tmp|old|rm)-(.+)-[a-z0-9_]{8}$")  # Registry.create/remove's mkdtemp folders
HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")

# kind -> what `--fix` does about it
ACTIONS = {
    "leftover": "delete",
    "interrupted": "restore",
    "orphan": "quarantine",
    "bad-manifest": "quarantine",
    "name-mismatch": "quarantine",
    "hash-mismatch": "quarantine",
    "bad-delta": "quarantine",
    "checkpoint": "delete",
    "old-schema": "migrate",
    "busy": "",
}


@dataclass
class Finding:
    kind: str  # one of ACTIONS
    name: str  # the concept name it concerns ("" when none can be told)
    path: str
    detail: str
    fixable: bool = True
    action: str = ""  # what --fix does: delete, restore, quarantine ("" when not fixable)
    fixed: bool = False
    moved_to: str = ""  # where a quarantined entry went

    def to_dict(self) -> dict:
        return asdict(self)


def _finding(kind: str, name: str, path: Path, detail: str) -> Finding:
    action = ACTIONS[kind]
    return Finding(kind, name, str(path), detail, fixable=bool(action), action=action)


def manifest_problems(manifest: dict) -> list[str]:
    """What is missing or malformed among the fields every entry's manifest has."""
    out = []
    if not isinstance(manifest.get("name"), str):
        out.append("name")
    tokens = manifest.get("tokens")
    if not (isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens)):
        out.append("tokens")
    if not isinstance(manifest.get("base"), dict):
        out.append("base")
    if not (isinstance(manifest.get("content_hash"), str) and HASH_RE.fullmatch(manifest["content_hash"])):
        out.append("content_hash")
    return out


def delta_problem(path: Path) -> str | None:
    """Why safetensors cannot read `path` as a cdiff delta (header, metadata and tensor index), or None."""
    from safetensors import safe_open

    from cdiff_cli.core.delta import EMBED_KEY, EMBED_KEY_2, FORMAT, content_problem

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
    except Exception as e:  # safetensors raises several types for a damaged file
        return f"safetensors cannot read it: {first_line(e)}"
    if meta.get("format") != FORMAT:
        return "it is not a cdiff delta (no format metadata)"
    if EMBED_KEY not in keys:
        return f"it has no {EMBED_KEY} tensor"
    try:
        tokens = json.loads(meta.get("tokens", ""))
    except ValueError:
        tokens = None
    if not isinstance(tokens, list):
        return "its token list (metadata) is unreadable"
    try:
        with safe_open(str(path), framework="pt") as f:
            weights = {k[5:]: f.get_tensor(k) for k in keys if k.startswith("unet.")}
            embeddings = [f.get_tensor(k) for k in (EMBED_KEY, EMBED_KEY_2) if k in keys]
    except Exception as e:
        return f"safetensors cannot read its tensors: {first_line(e)}"
    return content_problem(weights, tokens, meta.get("mode", "kv"), embeddings)


def entry_problem(folder: Path, name: str) -> tuple[str, str] | None:
    """(kind, detail) for what is wrong with the entry in `folder` (named `name`), or None if healthy."""
    if not folder.is_dir():
        return "orphan", "a file where an entry folder should be"
    missing = [f for f in (MANIFEST_FILE, DELTA_FILE) if not (folder / f).is_file()]
    if missing:
        return "orphan", f"no {' and no '.join(missing)} (left by an interrupted copy or a hand edit)"
    try:
        manifest = read_manifest(folder / MANIFEST_FILE)
    except (OSError, ValueError) as e:
        return "bad-manifest", f"{MANIFEST_FILE} is not a readable JSON object: {e}"
    bad = manifest_problems(manifest)
    if bad:
        return "bad-manifest", f"{MANIFEST_FILE} lacks valid field(s): {', '.join(bad)}"
    if manifest["name"] != name:
        return "name-mismatch", f"the manifest names it {manifest['name']!r}, the folder {name!r}"
    try:
        digest = "sha256:" + file_sha256(folder / DELTA_FILE)
    except OSError as e:
        return "bad-delta", f"{DELTA_FILE} cannot be read: {e}"
    if digest != manifest["content_hash"]:
        return "hash-mismatch", f"{DELTA_FILE} does not match the manifest's content_hash (changed or corrupted since it was written)"
    why = delta_problem(folder / DELTA_FILE)
    if why:
        return "bad-delta", f"{DELTA_FILE}: {why}"
    return None


def _utc_stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def quarantine(reg: Registry, path: Path, label: str) -> Path:
    """Move `path` to HOME/quarantine/LABEL-<UTC time>[-k]/ and return where it went."""
    reg.quarantine.mkdir(parents=True, exist_ok=True)
    base = f"{label}-{_utc_stamp()}"
    dest, k = reg.quarantine / base, 1
    while dest.exists():
        dest, k = reg.quarantine / f"{base}-{k}", k + 1
    shutil.move(str(path), str(dest))
    return dest


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class _Doctor:
    def __init__(self, reg: Registry, fix: bool, wait: float, discard: bool = False):
        self.reg, self.fix, self.wait, self.discard = reg, fix, wait, discard
        self.findings: list[Finding] = []

    def run(self) -> list[Finding]:
        from cdiff_cli.training.checkpoint import LEFTOVER_RE

        reg = self.reg
        names: dict[str, dict] = {}  # name -> {"entry": Path | None, "temps": [Path], "checkpoint": Path | None}

        def slot(n: str) -> dict:
            return names.setdefault(n, {"entry": None, "temps": [], "checkpoint": None})

        if reg.concepts.is_dir():
            for p in sorted(reg.concepts.iterdir()):
                if p.name.startswith("."):
                    m = TEMP_RE.match(p.name)
                    if m and p.is_dir():
                        slot(m.group(2))["temps"].append(p)
                    continue  # other hidden files are not ours
                slot(p.name)["entry"] = p
        if reg.checkpoints.is_dir():
            for p in sorted(reg.checkpoints.iterdir()):
                if not p.name.startswith("."):  # `.tmp-`/`.old-` folders of a killed save: see _checkpoint
                    slot(p.name)["checkpoint"] = p
                elif m := LEFTOVER_RE.fullmatch(p.name):
                    slot(m.group(1)).setdefault("checkpoint", None)
        for name in sorted(names):
            self._name(name, **names[name])
        return self.findings

    def _name(self, name: str, entry: Path | None, temps: list[Path], checkpoint: Path | None) -> None:
        valid = bool(NAME_RE.fullmatch(name))
        guard = self.reg.lock(name, shared=not self.fix, wait=self.wait) if valid else nullcontext()
        try:
            with guard:
                if valid:  # look again under the lock: the listing may be stale by now
                    entry, temps = self._rescan(name)
                self._check(name, valid, entry, temps, checkpoint)
        except BusyError as e:
            path = entry or checkpoint or (temps[0] if temps else self.reg.checkpoints / name)
            self.findings.append(Finding("busy", name, str(path), f"not checked: {e}", fixable=False))

    def _rescan(self, name: str) -> tuple[Path | None, list[Path]]:
        entry = self.reg.concepts / name
        temps = []
        if self.reg.concepts.is_dir():
            for p in sorted(self.reg.concepts.iterdir()):
                m = TEMP_RE.match(p.name)
                if m and m.group(2) == name and p.is_dir():
                    temps.append(p)
        return (entry if entry.exists() else None), temps

    def _check(self, name: str, valid: bool, entry: Path | None, temps: list[Path], checkpoint: Path | None) -> None:
        if entry is not None:
            if not valid:
                kind, detail = "orphan", f"{entry.name!r} is not a valid concept name"
                problem = (kind, detail) if entry.is_dir() else ("orphan", "a file where entry folders belong")
            else:
                problem = entry_problem(entry, name)
            if problem is not None:
                f = self._add(problem[0], name, entry, problem[1])
                if self.fix:
                    f.moved_to = str(quarantine(self.reg, entry, entry.name))
                    f.fixed = True
            elif (entry / (MANIFEST_FILE + ".tmp")).exists():
                stray = entry / (MANIFEST_FILE + ".tmp")
                f = self._add("leftover", name, stray, "left by a killed manifest update")
                if self.fix:
                    _delete(stray)
                    f.fixed = True
            else:
                self._schema(name, entry / MANIFEST_FILE)
        self._leftovers(name, entry, temps)
        if valid:
            self._checkpoint(name)

    def _schema(self, name: str, path: Path) -> None:
        """A manifest of an older schema: `--fix` writes it migrated (atomically, under the entry's lock)."""
        raw = read_manifest(path)
        if schema_of(raw) >= SCHEMA:
            return
        f = self._add("old-schema", name, path, f"written by an older cdiff (manifest schema {schema_of(raw)}, now "
                      f"{SCHEMA}); it is read as it is, and --fix writes it in schema {SCHEMA}")
        if self.fix:
            tmp = path.with_name(MANIFEST_FILE + ".tmp")
            tmp.write_text(json.dumps(migrate(raw), indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, path)
            f.fixed = True

    def _checkpoint(self, name: str) -> None:
        """A training checkpoint, under the training lock (a run in progress is busy, not a finding)."""
        from cdiff_cli.training import checkpoint as ckpt

        folder = self.reg.checkpoints / name
        if not folder.exists() and not ckpt.leftovers(folder):
            return
        try:
            with self.reg.hold(name):
                if self.fix:
                    ckpt.recover(folder)  # a save killed between its renames: the previous version returns
                if not folder.exists() and not ckpt.leftovers(folder):
                    return
                # Not damage: the work of an unfinished run. Deleted only when asked to.
                f = self._add("checkpoint", name, folder,
                              f"resumable training of {name}: run the same `cdiff train` with --resume, "
                              "or `cdiff doctor --fix --discard-checkpoints` to delete it")
                f.fixable = self.discard
                f.action = "delete" if self.discard else ""
                if self.fix and self.discard:
                    _delete(folder)
                    f.fixed = True
        except BusyError:
            self.findings.append(Finding("busy", name, str(folder), f"not checked: {name} is being trained", fixable=False))

    def _leftovers(self, name: str, entry: Path | None, temps: list[Path]) -> None:
        # Roll back: if a killed `--force` write moved the previous version aside and never put the new
        # one in place, the previous version comes back; every other leftover is deleted.
        restore = None
        if entry is None or not entry.exists():
            for t in temps:
                inner = t / name
                if t.name.startswith(".old-") and inner.is_dir() and entry_problem(inner, name) is None:
                    restore = t
                    break
        for t in temps:
            if t is restore:
                f = self._add("interrupted", name, t,
                              f"a killed write replacing {name} left its previous version here; --fix puts it back")
                if self.fix:
                    os.replace(t / name, self.reg.concepts / name)
                    _delete(t)
                    f.fixed = True
                continue
            what = {".tmp": "write", ".old": "replacement", ".rm-": "removal"}[t.name[:4]]
            f = self._add("leftover", name, t, f"left by a killed {what} of {name}")
            if self.fix:
                _delete(t)
                f.fixed = True

    def _add(self, kind: str, name: str, path: Path, detail: str) -> Finding:
        f = _finding(kind, name, path, detail)
        self.findings.append(f)
        return f


def check(registry: Registry, *, fix: bool = False, discard_checkpoints: bool = False,
          wait: float | None = None) -> list[Finding]:
    """Every problem found (and, with `fix`, repaired: see the module doc). Never raises for what it
    finds on disk; a name busy for longer than `wait` seconds (default LOCK_WAIT) is reported as `busy`.
    Training checkpoints are reported, and deleted only with `fix` and `discard_checkpoints`."""
    return _Doctor(registry, fix, LOCK_WAIT if wait is None else wait, discard_checkpoints).run()


def exit_code(findings: list[Finding]) -> int:
    """0 healthy or all fixed, 1 problems remain, 3 only busy names could not be checked. A resumable
    checkpoint and a manifest of an older schema are not problems."""
    if any(not f.fixed and f.kind not in ("busy", "checkpoint", "old-schema") for f in findings):
        return 1
    return 3 if any(f.kind == "busy" for f in findings) else 0
