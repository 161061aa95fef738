"""Registry: names, atomic writes, token ownership, manifests."""

import json

import pytest
import torch

from cdiff_cli.core.delta import Delta
from cdiff_cli.core.tokens import add_tokens, validate_token
from cdiff_cli.errors import CdiffError, NotFoundError
from cdiff_cli.registry import Registry, validate_name


def _delta(tokens=("<a1>",)):
    return Delta({"x.attn2.to_k.weight": torch.randn(4, 3)}, list(tokens), torch.randn(len(tokens), 3))


def test_names():
    for ok in ("mycat", "A+B", "cat_2.v1", "x"):
        assert validate_name(ok) == ok
    for bad in ("", "../evil", ".hidden", "a b", "a/b", "x" * 65):
        with pytest.raises(CdiffError):
            validate_name(bad)


def test_create_get_remove_roundtrip(tmp_path):
    reg = Registry(tmp_path)
    e = reg.create("mycat", _delta(), {"classes": ["cat"], "base": {"ref": "b", "fingerprint": "f"}})
    m = json.loads((e.path / "manifest.json").read_text())
    assert m["name"] == "mycat" and m["tokens"] == ["<a1>"] and m["content_hash"].startswith("sha256:")
    assert m["size_bytes"] == (e.path / "delta.safetensors").stat().st_size and len(m["id"]) == 8
    d = reg.get("mycat").load_delta()
    assert d.tokens == ["<a1>"]
    with pytest.raises(CdiffError, match="already exists"):
        reg.create("mycat", _delta(), {})
    reg.remove("mycat")
    with pytest.raises(NotFoundError):
        reg.get("mycat")
    assert [p.name for p in (tmp_path / "concepts").iterdir()] == []


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    reg = Registry(tmp_path)

    def boom(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(Delta, "save", boom)
    with pytest.raises(CdiffError, match="cannot save concept 'mycat': disk full"):
        reg.create("mycat", _delta(), {})
    assert list((tmp_path / "concepts").iterdir()) == []


def test_ctrl_c_between_the_renames_of_a_replacement_keeps_the_old_version(tmp_path, monkeypatch):
    import os

    import cdiff_cli.registry.store as registry_mod

    reg = Registry(tmp_path)
    old = reg.create("mycat", _delta(), {"note": "old"})
    real, calls = os.replace, []

    def stop_after_first(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old version is aside, the new one not yet in place
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(registry_mod.os, "replace", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        reg.create("mycat", _delta(), {"note": "new"}, overwrite=True)
    monkeypatch.setattr(registry_mod.os, "replace", real)
    assert reg.get("mycat").manifest["note"] == "old" and reg.get("mycat").id == old.id
    assert [p.name for p in (tmp_path / "concepts").iterdir()] == ["mycat"]


def test_tokens_are_owned_once_case_insensitively(tmp_path):
    reg = Registry(tmp_path)
    reg.create("a", _delta(["<A1>"]), {})
    with pytest.raises(CdiffError, match="already used"):
        reg.check_tokens_free(["<a1>"])
    reg.check_tokens_free(["<a1>"], replacing="a")
    reg.create("a+b", _delta(["<A1>", "V2"]), {"kind": "merged"})
    owners = reg.token_owners()
    assert owners["<a1>"].name == "a"  # the trained entry owns its token, not the merge
    assert owners["v2"].name == "a+b"  # a merge serves tokens nobody else owns


def test_token_validation(sd1_pipe):
    tok = sd1_pipe.tokenizer
    for ok in ("<mycat>", "V1", "v2", "<MyChair>", "zqxj9", "sksx1"):
        assert validate_token(ok, tok) == ok
    for bad, why in (("cat", "too short"), ("chair", "ordinary word"), ("photo", "ordinary word"), ("a b", "invalid"),
                     ("", "invalid"), ("tree", "ordinary word")):
        with pytest.raises(CdiffError, match=why):
            validate_token(bad, tok)


def test_adding_a_token_of_the_wrong_width_changes_nothing():
    from cdiff_cli.testing.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd1")
    n_tok, table = len(pipe.tokenizer), pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    with pytest.raises(CdiffError, match="wide"):
        add_tokens(pipe.tokenizer, pipe.text_encoder, ["<w1>"], torch.zeros(1, table.shape[1] + 1))
    assert len(pipe.tokenizer) == n_tok
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, table)


def test_base_probe_is_stable_across_precisions_and_tells_bases_apart(sd1_base):
    from cdiff_cli.core.layers import base_probe, same_base_probe
    from cdiff_cli.models.base import load_pipeline
    from cdiff_cli.testing.tiny import build_tiny_pipeline

    probes = [base_probe(load_pipeline(str(sd1_base), dtype=d).unet) for d in (torch.float32, torch.bfloat16, torch.float16)]
    assert same_base_probe(probes[0], probes[1]) and same_base_probe(probes[0], probes[2])
    assert not same_base_probe(probes[0], base_probe(build_tiny_pipeline("sd1", seed=7).unet))


def test_precision_resolution():
    from cdiff_cli.models.base import resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("fp16", cpu) == "fp32"  # half precision is not a CPU format
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", cpu) in ("bf16", "fp32")
