"""`cdiff compress`: low-rank storage of the k/v updates; loading expands them exactly as stored."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cdiff_cli.cli import app
from cdiff_cli.compression import compress_delta, output_fidelity, stored_bytes
from cdiff_cli.core.delta import Delta
from cdiff_cli.errors import CdiffError
from cdiff_cli.registry import Registry

from .conftest import RES

runner = CliRunner()


def _toy_delta(unet, rank=2):
    """k/v updates of a known rank."""
    g = torch.Generator().manual_seed(0)
    params = dict(unet.named_parameters())
    weights = {}
    for n, p in params.items():
        if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            out, inp = p.shape
            weights[n] = p.detach().clone() + 0.1 * torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g)
    return Delta(weights, ["<a>"], torch.randn(1, 32, generator=g))


def test_compressing_an_update_of_rank_r_at_rank_r_is_lossless(sd1_pipe):
    base = dict(sd1_pipe.unet.named_parameters())
    delta = _toy_delta(sd1_pipe.unet, rank=2)
    low = compress_delta(delta, base, rank=2, dtype=torch.float32)
    assert all(up.shape[1] == 2 for up, _ in low.factors.values())
    back = low.expanded(base)
    X = torch.randn(50, 32)
    fid = output_fidelity(delta, back, X)
    assert fid["max_relative_output_diff"] < 1e-5
    # At rank 1 some of the update is lost, and the measure sees it.
    lossy = compress_delta(delta, base, rank=1, dtype=torch.float32)
    assert output_fidelity(delta, lossy.expanded(base), X)["max_relative_output_diff"] > 1e-3
    assert stored_bytes(lossy) < stored_bytes(low) < delta.num_bytes()


def test_compressed_file_needs_its_base(sd1_pipe, tmp_path):
    base = dict(sd1_pipe.unet.named_parameters())
    low = compress_delta(_toy_delta(sd1_pipe.unet), base, rank=2)
    low.save(tmp_path / "d.safetensors")
    with pytest.raises(CdiffError, match="compressed"):
        Delta.load(tmp_path / "d.safetensors")
    loaded = Delta.load(tmp_path / "d.safetensors", sd1_pipe.unet)
    expected = low.expanded(base)
    for n, w in loaded.weights.items():
        torch.testing.assert_close(w, expected.weights[n])


def _gen(prompt, out, sd1_base):
    r = runner.invoke(app, ["gen", prompt, "-n", "2", "--steps", "4", "--seed", "3", "--height", str(RES), "--width", str(RES),
                            "--device", "cpu", "-o", str(out), "--json", "--base", str(sd1_base)])
    assert r.exit_code == 0, r.output
    return np.stack([np.asarray(Image.open(p)) for p in json.loads(r.stdout)["images"]]).astype(float)


def test_compress_cli_end_to_end(home, sd1_base, cat_images, chair_images, tmp_path):
    args = ["--base", str(sd1_base), "--steps", "6", "--batch-size", "2", "--resolution", str(RES), "--reg", "none",
            "--device", "cpu", "--lr", "5e-3"]
    assert runner.invoke(app, ["train", "mycat", str(cat_images), "--class", "cat", *args]).exit_code == 0
    assert runner.invoke(app, ["train", "mychair", str(chair_images), "--class", "chair", *args]).exit_code == 0
    full = _gen("photo of a <mycat> cat", tmp_path / "full", sd1_base)
    base_img = _gen("photo of a cat", tmp_path / "base", sd1_base)
    size_before = Registry().get("mycat").manifest["size_bytes"]

    r = runner.invoke(app, ["compress", "mycat", "--energy", "0.999", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    entry = Registry().get("mycat")
    assert entry.compressed and entry.manifest["compression"]["bytes_after"] == entry.manifest["size_bytes"]
    assert report["bytes_after"] < size_before and report["max_relative_output_diff"] < 0.05
    assert entry.tokens == ["<mycat>"]

    # The compressed entry generates (nearly) what the full one did, far from the base's images.
    small = _gen("photo of a <mycat> cat", tmp_path / "small", sd1_base)
    assert np.abs(small - full).mean() < 0.2 * np.abs(full - base_img).mean()
    # It merges, exports (expanded) and refuses a second compression.
    assert runner.invoke(app, ["merge", "mycat", "mychair"]).exit_code == 0
    r = runner.invoke(app, ["export", "mycat", "-o", str(tmp_path / "exp")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["compress", "mycat"])
    assert r.exit_code == 1 and "already compressed" in r.stderr


def test_compress_bad_options(home, sd1_base, cat_images):
    args = ["--base", str(sd1_base), "--steps", "2", "--batch-size", "2", "--resolution", str(RES), "--reg", "none", "--device", "cpu"]
    assert runner.invoke(app, ["train", "mycat", str(cat_images), "--class", "cat", *args]).exit_code == 0
    for bad in (["--rank", "0"], ["--energy", "1.5"], ["--rank", "2", "--energy", "0.9"]):
        r = runner.invoke(app, ["compress", "mycat", *bad])
        assert r.exit_code == 1 and r.stderr.startswith("error:"), (bad, r.output)
    assert not Registry().get("mycat").compressed
    r = runner.invoke(app, ["compress", "nosuch"])
    assert r.exit_code == 2


def test_compress_never_overwrites_an_entry_replaced_meanwhile(home, sd1_base, cat_images, monkeypatch):
    """`train --force` finishing while `compress` factorises must not be overwritten by the old version."""
    import cdiff_cli.compression as compress_mod
    from cdiff_cli.compression import compress_entry

    args = ["--base", str(sd1_base), "--steps", "2", "--batch-size", "2", "--resolution", str(RES), "--reg", "none", "--device", "cpu"]
    assert runner.invoke(app, ["train", "mycat", str(cat_images), "--class", "cat", *args]).exit_code == 0
    reg = Registry()
    real = compress_mod.compress_delta

    def replaced_meanwhile(delta, *a, **k):
        entry = reg.get("mycat")
        other = entry.load_delta()
        other.embeddings = other.embeddings + 1.0
        reg.create("mycat", other, {k: v for k, v in entry.manifest.items() if k == "base"}, overwrite=True)
        return real(delta, *a, **k)

    monkeypatch.setattr(compress_mod, "compress_delta", replaced_meanwhile)
    replacement_hash = None
    with pytest.raises(CdiffError, match="was replaced while it was being compressed"):
        compress_entry(reg, "mycat", rank=2)
    replacement_hash = reg.get("mycat").manifest["content_hash"]
    assert not reg.get("mycat").compressed and replacement_hash
