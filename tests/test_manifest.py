"""The typed manifest: what the registry writes, the schema version, and the migration of older files."""

import json

import torch

from cdiff_cli.core.delta import Delta
from cdiff_cli.registry import Registry
from cdiff_cli.registry import manifest as manifests
from cdiff_cli.registry.doctor import check, exit_code
from cdiff_cli.registry.manifest import SCHEMA, Manifest, Parent, migrate

BASE = {"ref": "b", "fingerprint": "f"}


def _delta(tokens=("<a1>",)):
    return Delta({"x.attn2.to_k.weight": torch.randn(4, 3)}, list(tokens), torch.randn(len(tokens), 3))


def test_a_typed_manifest_is_written_with_the_schema_and_the_registry_fields(tmp_path):
    reg = Registry(tmp_path)
    m = manifests.merged(["cat", "chair"], [["a {} cat"], []], BASE, {"method": "closed-form", "ridge": 1e-3},
                         [Parent("a", "1234abcd"), Parent("b")])
    e = reg.create("a+b", _delta(("<a>", "<b>")), m)
    on_disk = json.loads((e.path / "manifest.json").read_text())
    assert on_disk["schema"] == SCHEMA and on_disk["kind"] == "merged" and on_disk["tokens"] == ["<a>", "<b>"]
    assert on_disk["parents"] == [{"name": "a", "id": "1234abcd"}, {"name": "b", "id": ""}]
    assert list(on_disk)[:4] == ["name", "id", "tokens", "mode"]  # the entry's identity first, as before
    assert "train" not in on_disk and "source" not in on_disk  # fields a merge does not have are left out
    info = reg.get("a+b").info
    assert info == Manifest.from_dict(on_disk) and info.parents[0] == Parent("a", "1234abcd")
    assert info.content_hash == on_disk["content_hash"] and info.size_bytes > 0 and e.parents == ["a", "b"]


def test_every_token_gets_a_class_and_a_caption_list(tmp_path):
    e = Registry(tmp_path).create("x", _delta(("<a>", "<b>")), manifests.imported([], BASE, {"format": "diffusers"}))
    assert e.info.classes == ["", ""] and e.info.captions == [[], []] and e.kind == "imported"


def _schema_1(entry_path, **changes):
    """Rewrite an entry's manifest as cdiff wrote it before the schema field (schema 1)."""
    path = entry_path / "manifest.json"
    m = json.loads(path.read_text())
    for k in ("schema", "captions"):
        m.pop(k, None)
    m.update(changes)
    path.write_text(json.dumps(m))
    return m


def test_a_schema_1_manifest_reads_migrated_and_doctor_fix_writes_it_back(tmp_path):
    reg = Registry(tmp_path)
    e = reg.create("m", _delta(("<a>", "<b>")), {"kind": "merged", "classes": ["cat", "chair"], "base": BASE})
    old = _schema_1(e.path, parents=["a", "b"], classes=["cat"], note="kept")
    got = reg.get("m")
    assert got.manifest["schema"] == SCHEMA and got.parents == ["a", "b"]
    assert got.info.classes == ["cat", ""] and got.info.captions == [[], []] and got.info.extra == {"note": "kept"}
    assert json.loads((e.path / "manifest.json").read_text()) == old  # reading never writes

    findings = check(reg)
    assert [f.kind for f in findings] == ["old-schema"] and exit_code(findings) == 0  # not a problem
    fixed = check(reg, fix=True)
    assert fixed[0].fixed and exit_code(fixed) == 0
    now = json.loads((e.path / "manifest.json").read_text())
    assert now == migrate(old) and now["schema"] == SCHEMA and now["note"] == "kept"
    assert check(reg) == [] and reg.get("m").load_delta().tokens == ["<a>", "<b>"]  # the content hash still holds


def test_an_update_writes_the_current_schema(tmp_path):
    reg = Registry(tmp_path)
    e = reg.create("x", _delta(), {"classes": ["cat"], "base": BASE})
    _schema_1(e.path)
    reg.update_manifest("x", metrics={"score": 1.0})
    assert json.loads((e.path / "manifest.json").read_text())["schema"] == SCHEMA


def test_a_newer_schema_is_read_as_it_is_and_its_unknown_fields_kept(tmp_path):
    m = {"schema": SCHEMA + 1, "name": "x", "tokens": ["<a>"], "kind": "trained", "classes": ["cat"], "base": BASE,
         "future": {"a": 1}}
    assert migrate(m) == m
    info = Manifest.from_dict(m)
    assert info.schema == SCHEMA + 1 and info.extra == {"future": {"a": 1}} and info.to_dict()["future"] == {"a": 1}


def test_fields_of_the_wrong_type_read_as_neutral_values():
    info = Manifest.from_dict({"tokens": ["<a>", 3], "classes": "cat", "parents": [1, {"name": "p"}], "size_bytes": -4,
                               "kind": 7, "base": [], "metrics": "high"})
    assert info.tokens == ["<a>"] and info.classes == [""] and info.parents == [Parent("p")]
    assert info.size_bytes == 0 and info.kind == "trained" and info.base == {} and info.metrics is None
