"""The whole loop from the command line, on a tiny local base, with a temporary CDIFF_HOME."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cdiff_cli.cli import app
from cdiff_cli.registry import Registry

from .conftest import RES

runner = CliRunner()
TRAIN = ["--steps", "4", "--batch-size", "2", "--resolution", str(RES), "--num-reg", "2", "--device", "cpu"]
GEN = ["--steps", "3", "--device", "cpu", "--height", str(RES), "--width", str(RES)]


def cdiff(*args, ok=True):
    r = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output + (repr(r.exception) if r.exception else "")
    return r


def out_json(r):
    return json.loads(r.stdout)


def test_full_loop(home, sd1_base, cat_images, chair_images, tmp_path):
    cdiff("train", "mycat", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN)
    r = cdiff("train", "mychair", chair_images, "--class", "chair", "--token", "V2", "--base", sd1_base, *TRAIN, "--json")
    assert out_json(r)["tokens"] == ["V2"]
    # Regularisation images were generated once per class and cached in the home.
    cached = sorted((home / "cache" / "reg").rglob("*.png"))
    assert len(cached) == 4

    listing = out_json(cdiff("list", "--json"))
    assert [e["name"] for e in listing] == ["mycat", "mychair"]
    assert listing[0]["tokens"] == ["<mycat>"] and listing[0]["base"] == str(sd1_base)
    shown = out_json(cdiff("show", "mycat", "--json"))
    assert shown["classes"] == ["cat"] and shown["train"]["steps"] == 4
    assert shown["train"]["effective_lr"] == pytest.approx(2e-5)
    assert len(shown["concepts"][0]["images"]) == 4 and shown["base"]["fingerprint"]
    assert "mycat" in cdiff("list").stdout

    # One concept: the delta changes the images.
    g0 = out_json(cdiff("gen", "photo of a cat", *GEN, "--base", sd1_base, "-o", tmp_path / "g", "--json"))
    g1 = out_json(cdiff("gen", "photo of a <mycat> cat", *GEN, "-o", tmp_path / "g", "--json"))
    assert g0["concepts"] == [] and g1["concepts"] == ["mycat"]
    a0 = np.asarray(Image.open(g0["images"][0]))
    a1 = np.asarray(Image.open(g1["images"][0]))
    assert a0.shape == (RES, RES, 3) and not np.array_equal(a0, a1)
    params = json.loads(Image.open(g1["images"][0]).text["parameters"])
    assert params["prompt"] == "photo of a <mycat> cat" and params["seed"] == 0 and params["steps"] == 3

    # Two concepts in one prompt, with a user-picked token in another case: merged on the fly.
    g2 = out_json(cdiff("gen", "v2 chair next to a <MyCat> cat", *GEN, "-o", tmp_path / "g", "--json"))
    assert sorted(g2["concepts"]) == ["mycat", "mychair"]
    assert len(list((home / "cache" / "merges").glob("*.safetensors"))) == 1

    # An explicit merge, then preferred by gen for the same pair.
    r = cdiff("merge", "mycat", "mychair", "--json")
    assert out_json(r)["name"] == "mycat+mychair" and out_json(r)["tokens"] == ["<mycat>", "V2"]
    g3 = out_json(cdiff("gen", "V2 chair and a <mycat> cat", *GEN, "-o", tmp_path / "g", "--json"))
    assert g3["concepts"] == ["mycat+mychair"]
    # The cached on-the-fly merge and the explicit merge are the same computation.
    a2 = np.asarray(Image.open(g2["images"][0]))
    assert a2.shape == (RES, RES, 3)

    # Export, re-import under a new name with renamed token, and the imported copy generates the same image.
    exp = out_json(cdiff("export", "mycat", "--format", "diffusers", "-o", tmp_path / "exp", "--json"))
    assert any(f.endswith("pytorch_custom_diffusion_weights.safetensors") for f in exp["files"])
    cdiff("add", "mycat2", tmp_path / "exp", "--token", "<cat2>", "--class", "cat", "--base", sd1_base)
    g4 = out_json(cdiff("gen", "photo of a <cat2> cat", *GEN, "-o", tmp_path / "g", "--json"))
    assert np.array_equal(np.asarray(Image.open(g4["images"][0])), a1)

    cdiff("rm", "mycat2", "-y")
    assert sorted(e["name"] for e in out_json(cdiff("list", "--json"))) == ["mycat", "mycat+mychair", "mychair"]
    assert cdiff("path", "mycat").stdout.strip().endswith("concepts/mycat")


def test_one_concept_merged_alone_is_constrained(home, sd1_base, cat_images, tmp_path):
    """`cdiff merge NAME`: the concept's own prompts keep their trained k/v outputs; ordinary captions move less."""
    import torch

    from cdiff_cli.core.delta import apply_delta
    from cdiff_cli.merging import prompt_features
    from cdiff_cli.merging.captions import load_captions
    from cdiff_cli.models.base import load_pipeline

    cdiff("train", "mycat", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN, "--reg", "none", "--lr", "1e-3")
    r = out_json(cdiff("merge", "mycat", "--json"))
    assert r["name"] == "mycat-constrained" and r["tokens"] == ["<mycat>"] and r["parents"] == ["mycat"]
    reg = Registry(home)
    pipe = load_pipeline(sd1_base)
    W0 = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    raw, kept = reg.get("mycat").load_delta(pipe.unet), reg.get("mycat-constrained").load_delta(pipe.unet)
    apply_delta(pipe, raw)  # adds the token, so the prompts below read it
    own = torch.cat(prompt_features(pipe, ["<mycat> cat"]))
    ordinary = torch.cat(prompt_features(pipe, list(load_captions())[-200:]))
    moved = {"raw": 0.0, "kept": 0.0}
    for n in raw.weights:
        want = own @ raw.weights[n].T
        assert (own @ kept.weights[n].T - want).abs().max() <= 1e-3 * want.abs().max(), n
        for label, d in (("raw", raw), ("kept", kept)):
            moved[label] += float(torch.linalg.matrix_norm(ordinary @ (d.weights[n] - W0[n]).T))
    assert moved["kept"] < 0.6 * moved["raw"], moved  # 0.50x with the class prompt pinned, 0.40x without
    cls = prompt_features(pipe, ["photo of a cat"])[0]  # pinned near the base: moved less than by the raw delta
    assert sum(float(torch.linalg.matrix_norm(cls @ (kept.weights[n] - W0[n]).T)) for n in raw.weights) < \
        sum(float(torch.linalg.matrix_norm(cls @ (raw.weights[n] - W0[n]).T)) for n in raw.weights)
    # gen prefers the user's explicit merge of exactly the prompt's concepts; -c picks the trained entry.
    g = out_json(cdiff("gen", "photo of a <mycat> cat", *GEN, "-o", tmp_path / "g", "--json"))
    assert g["concepts"] == ["mycat-constrained"]
    g = out_json(cdiff("gen", "photo of a <mycat> cat", *GEN, "-c", "mycat", "-o", tmp_path / "g", "--json"))
    assert g["concepts"] == ["mycat"]


def test_joint_training_makes_one_entry_with_every_token(home, sd1_base, cat_images, chair_images):
    r = cdiff("train", "pair", "--concept", f"<c1>:cat:{cat_images}", "--concept", f"<c2>:chair:{chair_images}",
              "--base", sd1_base, *TRAIN, "--reg", "none", "--json")
    assert out_json(r)["tokens"] == ["<c1>", "<c2>"]
    entry = Registry(home).get("pair")
    assert entry.classes == ["cat", "chair"]
    assert entry.load_delta().embeddings.shape[0] == 2


def test_offload_on_the_cpu_warns_and_trains_without_it(home, sd1_base, cat_images):
    r = cdiff("train", "off", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN, "--reg", "none", "--offload")
    assert "--offload does nothing on the CPU" in r.stderr
    manifest = Registry(home).get("off").manifest
    assert manifest["train"]["offload"] is False  # recorded as what actually ran


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "x", "NOPE", "--class", "cat"], "image folder not found"),
        (["train", "bad name!", "IMGS", "--class", "cat"], "invalid name"),
        (["train", "x", "IMGS", "--class", "cat", "--token", "cat"], "too short"),
        (["train", "x", "IMGS", "--class", "cat", "--token", "chair"], "ordinary word"),
        (["train", "x", "IMGS", "--class", "cat", "--base", "/no/such/folder"], "base not found"),
        (["train", "x", "IMGS"], "--class"),
        (["train", "x", "--concept", "nonsense"], "TOKEN:CLASS:DIR"),
        (["gen", "a <nobody> here"], "<nobody>"),
        (["show", "ghost"], "no concept named"),
        (["rm", "ghost", "-y"], "no concept named"),
        (["merge", "ghost"], "no concept named"),
        (["add", "x", "/no/such/file.bin"], "not found"),
        (["export", "ghost", "-o", "OUT"], "no concept named"),
    ],
)
def test_bad_input_gives_one_line_and_no_entry(home, sd1_base, cat_images, tmp_path, args, message):
    args = [str(cat_images) if a == "IMGS" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    if args[0] == "train" and "--base" not in args:
        args += ["--base", str(sd1_base), *TRAIN]
    r = cdiff(*args, ok=False)
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], r.stderr
    assert Registry(home).entries() == []


def test_hub_base_offline_is_one_clear_line(home, cat_images):
    r = cdiff("train", "x", cat_images, "--class", "cat", "--base", "someone/not-a-model", *TRAIN, ok=False)
    assert r.exit_code == 1
    assert "cannot load base model someone/not-a-model" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_folder_without_model_index_is_refused(home, cat_images, tmp_path):
    (tmp_path / "empty").mkdir()
    r = cdiff("train", "x", cat_images, "--class", "cat", "--base", tmp_path / "empty", *TRAIN, ok=False)
    assert "not a diffusers model folder" in r.stderr


def test_ctrl_c_leaves_no_entry(home, sd1_base, cat_images, monkeypatch):
    import cdiff_cli.training as train_mod

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train", interrupted)
    r = cdiff("train", "x", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN, ok=False)
    assert r.exit_code == 130 and "nothing was saved" in r.stderr
    assert Registry(home).entries() == []
    assert not any(p.name.startswith(".tmp") for p in (home / "concepts").glob("*")) if (home / "concepts").exists() else True


def test_existing_name_and_token_are_protected(home, sd1_base, cat_images):
    cdiff("train", "mycat", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN, "--reg", "none")
    r = cdiff("train", "mycat", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN, ok=False)
    assert "already exists" in r.stderr
    r = cdiff("train", "other", cat_images, "--class", "cat", "--token", "<MYCAT>", "--base", sd1_base, *TRAIN, ok=False)
    assert "already used by concept 'mycat'" in r.stderr
    cdiff("train", "mycat", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN, "--reg", "none", "--force", "--seed", "3")
    assert Registry(home).get("mycat").manifest["train"]["seed"] == 3


def test_gen_refuses_a_mismatched_base(home, sd1_base, sd2_base, cat_images, tmp_path):
    cdiff("train", "mycat", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN, "--reg", "none")
    r = cdiff("gen", "photo of a <mycat> cat", *GEN, "--base", sd2_base, "-o", tmp_path, ok=False)
    assert r.exit_code == 1 and "belongs to base" in r.stderr


def test_sd2_base_end_to_end(home, sd2_base, cat_images, tmp_path):
    cdiff("train", "c2", cat_images, "--class", "cat", "--token", "V7", "--base", sd2_base, *TRAIN)
    g = out_json(cdiff("gen", "photo of a V7 cat", *GEN, "-o", tmp_path, "--json"))
    assert g["concepts"] == ["c2"] and len(g["images"]) == 1


def test_real_regularisation_folder_with_captions(home, sd1_base, cat_images, chair_images):
    (chair_images / "img0.txt").write_text("a blue chair in a kitchen")
    r = cdiff("train", "mycat", cat_images, "--class", "cat", "--reg-dir", chair_images, "--base", sd1_base, *TRAIN)
    m = Registry(home).get("mycat").manifest
    assert m["train"]["regularisation"]["kind"] == "dir" and r.exit_code == 0


def test_help_explains_lr_scaling():
    r = cdiff("train", "--help")
    assert "batch size" in r.stdout and "--concept" in r.stdout


def test_cli_starts_without_torch():
    """--help, list, show and shell completion must not pay for importing torch/diffusers."""
    import subprocess
    import sys

    code = "import sys, cdiff_cli.cli; bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; print(bad)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_an_unforeseen_failure_is_said_in_words():
    from cdiff_cli.cli._app import in_words

    assert in_words(RecursionError("maximum recursion depth exceeded")).startswith("the input is nested too deeply")
    assert in_words(ZeroDivisionError("division by zero")).startswith("a value in the input led to a division by zero")
    assert in_words(OSError(28, "No space left on device", "/x")) == "No space left on device: /x"
    import shutil

    assert in_words(shutil.SameFileError("a and b are the same file")).startswith("the source and the destination")
    assert in_words(RuntimeError("boom")) == "unexpected error: RuntimeError: boom (set CDIFF_DEBUG=1 for details)"
