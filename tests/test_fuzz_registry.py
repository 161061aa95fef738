"""Property tests: concept names are always one safe path component, and no manifest on disk, however
broken, makes the registry or the doctor fail with anything but a clear CdiffError."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cdiff_cli.core.delta import Delta
from cdiff_cli.errors import CdiffError
from cdiff_cli.registry import Entry, Registry, doctor, validate_name

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DELTA = Delta({"x.attn2.to_k.weight": torch.zeros(2, 2)}, ["<f1>"], torch.zeros(1, 2))
DELTA_2 = Delta({"x.attn2.to_k.weight": torch.zeros(2, 2)}, ["<f2>"], torch.zeros(1, 2))  # a token is one entry's

# Text near the edge of the name rules, besides arbitrary text.
name_like = st.text(alphabet=st.sampled_from("aZ09._+-/\\\n\r\t\0 é.."), max_size=70)


@FUZZ
@given(st.one_of(st.text(max_size=80), name_like))
@example("x\n")  # `$` in a regex also matches before a final newline
@example("..")
@example("a" * 64)
@example("a" * 65)
def test_a_valid_name_is_one_safe_path_component(text):
    try:
        name = validate_name(text)
    except CdiffError:
        return
    assert name == text and 0 < len(name) <= 64
    assert not any(c in name for c in "/\\\0\n\r") and ".." not in Path(name).parts and name not in (".", "..")
    assert not name.startswith(".")  # would hide it among the registry's own temp folders
    with tempfile.TemporaryDirectory() as home:
        reg = Registry(home)
        e = reg.create(name, DELTA, {"base": {}})
        assert e.path.parent == reg.concepts and e.path.name == name
        assert [x.name for x in reg.entries()] == [name]
        assert reg.get(name).tokens == ["<f1>"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
# Manifests that look almost right: the real keys with arbitrary values.
near_manifests = st.fixed_dictionaries(
    {},
    optional={k: json_values for k in ("name", "id", "tokens", "classes", "base", "kind", "content_hash", "storage",
                                        "size_bytes", "parents", "metrics")},
)
manifest_bytes = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    near_manifests.map(lambda v: json.dumps(v).encode()),
)


def _check_registry(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as home:
        reg = Registry(home)
        reg.create("ok", DELTA, {"base": {}})
        reg.create("x", DELTA_2, {"base": {}})
        (reg.concepts / "x" / "manifest.json").write_bytes(data)
        try:
            e = reg.get("x")
        except CdiffError:
            pass
        else:
            assert isinstance(e, Entry) and isinstance(e.manifest, dict)
            # What every command reads from an entry is well-typed, whatever the manifest holds.
            assert isinstance(e.tokens, list) and isinstance(e.classes, list) and isinstance(e.base, dict)
        names = [x.name for x in reg.entries()]
        assert "ok" in names
        reg.token_owners()
        findings = doctor.check(reg)
        assert all(f.name == "x" for f in findings)
        fixed = doctor.check(reg, fix=True)
        assert doctor.exit_code(fixed) == 0 and doctor.check(reg) == []
        assert reg.get("ok").load_delta().tokens == ["<f1>"]


@FUZZ
@given(manifest_bytes)
@example(b"[" * 100_000)  # nesting deeper than the JSON parser's recursion limit
@example(b"\xff\xfe")  # not UTF-8
@example(b'{"name": "x", "tokens": "<f1>", "base": [], "content_hash": 5}')
def test_any_manifest_reads_as_an_entry_or_a_clear_error(data):
    _check_registry(data)
