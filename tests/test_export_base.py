"""Exports describe their base (`cdiff_base.json` beside the files, and the LoRA's metadata): `cdiff add` of an
export needs no --base on the machine that made it, refuses another base with one line, and files are
created with the user's umask."""

import json
import os
import stat

import pytest
from safetensors import safe_open

from cdiff_cli.formats import BASE_FILE
from cdiff_cli.registry import Registry, same_base
from cdiff_cli.testing.tiny import build_tiny_pipeline

from .test_cli import TRAIN, cdiff


@pytest.fixture
def trained(home, sd1_base, cat_images, monkeypatch):
    monkeypatch.delenv("CDIFF_BASE", raising=False)
    cdiff("train", "mycat", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN, "--reg", "none")
    return Registry(home).get("mycat")


@pytest.mark.parametrize("fmt", ["diffusers", "reference", "cdiff", "lora"])
def test_an_export_is_added_back_without_base(trained, tmp_path, fmt):
    out = tmp_path / fmt
    files = json.loads(cdiff("export", "mycat", "--format", fmt, "-o", out, "--json").stdout)["files"]
    assert str(out / BASE_FILE) in files
    record = json.loads((out / BASE_FILE).read_text())
    assert record["ref"] == trained.base["ref"] and record["fingerprint"] == trained.base["fingerprint"]
    cdiff("add", "copy", out, "--token", "<copy>")  # no --base, and CDIFF_BASE unset
    copy = Registry(trained.registry.home).get("copy")
    assert copy.base["ref"] == trained.base["ref"] and same_base(copy.base, trained.base)


def test_the_lora_carries_its_base_in_its_metadata(trained, tmp_path):
    cdiff("export", "mycat", "--format", "lora", "-o", tmp_path / "l")
    with safe_open(str(tmp_path / "l" / "mycat.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["cdiff_base"] == trained.base["ref"] and meta["cdiff_base_fingerprint"] == trained.base["fingerprint"]


def test_add_refuses_a_base_other_than_the_recorded_one(trained, tmp_path):
    other = tmp_path / "other-base"
    build_tiny_pipeline("sd1", seed=1).save_pretrained(other)
    cdiff("export", "mycat", "--format", "diffusers", "-o", tmp_path / "exp")
    r = cdiff("add", "copy", tmp_path / "exp", "--token", "<copy>", "--base", other, ok=False)
    assert r.exit_code == 1 and "was exported from another base model" in r.stderr and "Traceback" not in r.output
    assert len(r.stderr.strip().splitlines()) == 1
    assert not Registry(trained.registry.home).exists("copy")


@pytest.mark.parametrize("content", ["not json", '{"ref": 3, "fingerprint": "x"}', "[]"])
def test_a_damaged_base_record_is_named(trained, tmp_path, content):
    cdiff("export", "mycat", "--format", "diffusers", "-o", tmp_path / "exp")
    (tmp_path / "exp" / BASE_FILE).write_text(content)
    r = cdiff("add", "copy", tmp_path / "exp", "--token", "<copy>", ok=False)
    assert r.exit_code == 1 and BASE_FILE in r.stderr and "Traceback" not in r.output


def test_files_are_created_with_the_users_umask(trained, tmp_path):
    old = os.umask(0o022)
    try:
        cdiff("train", "again", trained.registry.home.parent / "cat", "--class", "cat", "--base", trained.base["ref"],
              *TRAIN, "--reg", "none", "--token", "<again>")
        cdiff("export", "again", "--format", "lora", "-o", tmp_path / "l")
    finally:
        os.umask(old)
    entry = Registry(trained.registry.home).get("again")
    paths = [entry.path, *entry.path.iterdir(), *(tmp_path / "l").iterdir()]
    for p in paths:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o044 == 0o044, f"{p}: {oct(mode)}"  # group and others can read it (umask 022)
