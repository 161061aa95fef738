"""cdiff eval: the metric formulas by hand, prompt selection, feature models built offline, and the
command end to end on a tiny base with a tiny CLIP (and DINO-like ViT) saved from configs."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cdiff_cli.cli import app
from cdiff_cli.errors import CdiffError
from cdiff_cli.evaluation import metrics as M
from cdiff_cli.evaluation.prompts import (
    builtin_prompts,
    category_of,
    load_prompt_set,
    read_prompt_file,
    select_prompts,
    strip_tokens,
)
from cdiff_cli.registry import Registry

from .conftest import RES

runner = CliRunner()
TRAIN = ["--steps", "4", "--batch-size", "2", "--resolution", str(RES), "--reg", "none", "--device", "cpu"]


def cdiff(*args, ok=True):
    r = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output + (repr(r.exception) if r.exception else "")
    return r


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared, busy 2-core machine OpenMP's
    spinning threads make them many times slower: these tests run single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- tiny feature models, saved like hub folders -------------------------------------------------------


def save_tiny_clip(folder: Path) -> Path:
    """A 2-layer CLIP (hidden 32, 32 px images, patch 8) with a tiny BPE tokenizer and a hub-style
    `preprocessor_config.json` (the legacy CLIPFeatureExtractor format of openai/clip-vit-base-patch32)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from cdiff_cli.testing.tiny import write_tiny_tokenizer

    write_tiny_tokenizer(folder)
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
    torch.manual_seed(0)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **layers),
        vision_config=dict(image_size=32, patch_size=8, **layers),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 32}))
    return folder


def save_tiny_dino(folder: Path) -> Path:
    """A 2-layer ViTModel (the class of facebook/dino-vits16) with its hub-style preprocessor config."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(1)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 2, "size": 32}))
    return folder


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("scorers") / "clip")


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory) -> Path:
    return save_tiny_dino(tmp_path_factory.mktemp("scorers") / "dino")


# -- the formulas, by hand ---------------------------------------------------------------------------


def test_clip_score_by_hand():
    img = [[1, 0], [0, 1], [1, 1], [3, 4]]
    txt = [[2, 0], [1, 0], [-1, -1], [4, 3]]
    # cosines: 1, 0, -1 (clamped to 0), 24/25
    expected = 2.5 * np.array([1.0, 0.0, 0.0, 0.96])
    assert np.allclose(M.clip_scores(img, txt), expected)
    assert M.clip_score(img, txt) == pytest.approx(expected.mean())
    assert M.clip_score([[0.6, 0.8]], [[0.8, 0.6]]) == pytest.approx(2.5 * 0.96)
    assert M.clip_score([[1, 0]], [[-1, 0]]) == 0.0
    assert M.clip_score(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]])) == pytest.approx(2.5 / np.sqrt(2))


def test_mean_cosine_and_normalisation_by_hand():
    a = [[1, 0], [0, 2]]
    b = [[1, 1], [5, 0]]
    # cos matrix: [[1/sqrt2, 1], [1/sqrt2, 0]]
    assert M.mean_cosine(a, b) == pytest.approx((2 / np.sqrt(2) + 1) / 4)
    assert M.mean_cosine(a, [[1, 1]]) == pytest.approx(1 / np.sqrt(2))
    n = M.normalize([[3, 4], [0, 0]])
    assert np.allclose(n, [[0.6, 0.8], [0, 0]])
    with pytest.raises(ValueError):
        M.cosine_matrix([[1, 0]], [[1, 0, 0]])


def kid_by_loops(x, y, paired=False):
    """The unbiased MMD^2 estimator written out term by term."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    d = x.shape[1]

    def k(a, b):
        return (a @ b / d + 1) ** 3

    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    if paired:
        sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n) if i != j) / (m * (m - 1))
    else:
        sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def test_kid_matches_the_estimator_written_out():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 5)), rng.normal(0.3, 1.2, size=(9, 5))
    assert M.kid(x, y) == pytest.approx(kid_by_loops(x, y), rel=1e-10)
    y7 = y[:7]
    assert M.kid(x, y7, paired=True) == pytest.approx(kid_by_loops(x, y7, paired=True), rel=1e-10)
    # The kernel itself: (x.y/d + 1)^3
    assert M.polynomial_kernel([[1, 2]], [[3, 4]])[0, 0] == pytest.approx((11 / 2 + 1) ** 3)


def test_kid_of_identical_and_shifted_sets():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 8))
    assert M.kid(x, x, paired=True) == pytest.approx(0.0, abs=1e-9)  # same seeds, no change: exactly 0
    # The independent-sample formula on two identical sets: -2/m (mean k(x_i, x_i) - mean k(x_i, x_j)).
    kxx = M.polynomial_kernel(x, x)
    off = (kxx.sum() - np.trace(kxx)) / (200 * 199)
    assert M.kid(x, x) == pytest.approx(-2 / 200 * (np.trace(kxx) / 200 - off))
    same = rng.normal(size=(200, 8))  # another sample of the same distribution
    shifted = rng.normal(size=(200, 8)) + 1.0
    assert abs(M.kid(x, same)) < 0.05
    assert M.kid(x, shifted) > 0.5 > 20 * abs(M.kid(x, same))
    assert M.kid(x, shifted + 1.0) > M.kid(x, shifted)
    assert M.kid(x, shifted, subset_size=50, subsets=10) > 0.5
    with pytest.raises(ValueError):
        M.kid(x[:1], x)
    with pytest.raises(ValueError):
        M.kid(x[:3], x[:4], paired=True)


# -- prompts -------------------------------------------------------------------------------------------


def test_strip_tokens():
    assert strip_tokens("photo of a <mycat> cat on a beach", ["<mycat>"]) == "photo of a cat on a beach"
    assert strip_tokens("V2 chair , next to a <MyCat> cat", ["<mycat>", "v2"]) == "chair, next to a cat"
    assert strip_tokens("a v10 robot and a V1 toy", ["V1"]) == "a v10 robot and a toy"
    assert strip_tokens("photo of a <a>'s bowl", ["<a>"]) == "photo of a's bowl"


def test_prompt_set_shape_and_categories():
    ps = load_prompt_set()
    assert len(ps["categories"]) >= 10 and "generic" in ps["categories"]
    for name, cat in ps["categories"].items():
        prompts = [p for kind in ps["kinds"] for p in cat["prompts"][kind]]
        assert len(prompts) == 20 and all(p.count("{}") == 1 for p in prompts), name
        assert len(set(prompts)) == 20
    assert len(ps["pairs"]) == 12 and all("{0}" in p and "{1}" in p for p in ps["pairs"])
    words = [w for c in ps["categories"].values() for w in c["classes"]]
    assert len(words) == len(set(words))
    for word, cat in [("cat", "pet"), ("Tabby Cats", "pet"), ("dog", "pet"), ("sofa", "furniture"), ("teapot", "object"),
                      ("sneakers", "object"), ("teddy bear", "toy"), ("woman", "person"), ("barn", "scene"),
                      ("motorcycle", "vehicle"), ("sunflowers", "plant"), ("sunglasses", "wearable"),
                      ("spaceship", "generic"), ("", "generic")]:
        assert category_of(word) == cat, word


def test_builtin_prompts_interleave_kinds_and_pairs():
    prompts, desc = builtin_prompts(["<mycat>"], ["cat"])
    assert desc == "built-in: pet" and len(prompts) == 20
    assert [p.kind for p in prompts[:4]] == load_prompt_set()["kinds"]
    assert all("<mycat> cat" in p.prompt and "<mycat>" not in p.text and " cat" in p.text for p in prompts)
    pairs, desc = builtin_prompts(["<a1>", "V2"], ["cat", "chair"])
    assert desc == "built-in: pairs" and len(pairs) == 12
    assert all("<a1> cat" in p.prompt and "V2 chair" in p.prompt and p.kind == "pair" for p in pairs)
    assert pairs[0].text == "photo of a cat and a chair"
    three, _ = builtin_prompts(["<a>", "<b>", "<c>"], ["cat", "dog", "chair"])
    assert len(three) == 36 and {"<a>" in p.prompt for p in three[:3]} == {True, False}
    limited, _ = select_prompts(["<mycat>"], ["cat"], max_prompts=3)
    assert len(limited) == 3


def test_prompt_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# my prompts\n{} in a box\n\n{1} beside {0}\na plain photo of a garden\n")
    ps = read_prompt_file(f, ["<a>", "<b>"], ["cat", "chair"])
    assert [p.prompt for p in ps] == ["<a> cat and <b> chair in a box", "<b> chair beside <a> cat", "a plain photo of a garden"]
    assert [p.text for p in ps] == ["cat and chair in a box", "chair beside cat", "a plain photo of a garden"]
    f.write_text("{2} oops\n")
    with pytest.raises(CdiffError, match="only 2 concept"):
        read_prompt_file(f, ["<a>", "<b>"], ["cat", "chair"])
    with pytest.raises(CdiffError, match="not found"):
        select_prompts(["<a>"], ["cat"], prompt_file=tmp_path / "nope.txt")


# -- feature models ------------------------------------------------------------------------------------


def test_tiny_clip_and_dino_load_with_pil_processors(tiny_clip, tiny_dino):
    from PIL import Image

    from cdiff_cli.evaluation.features import load_clip, load_dino

    clip = load_clip(str(tiny_clip))
    if importlib.util.find_spec("torchvision") is None:  # transformers 5 falls back to the PIL processors
        assert type(clip.processor).__name__ == "CLIPImageProcessorPil"
    ims = [Image.new("RGB", (64, 48), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    f = clip.images(ims)
    assert f.shape == (3, 16) and np.isfinite(f).all()
    clip.batch = 2  # batching gives the same features
    assert np.allclose(clip.images(ims), f, atol=1e-5)
    t = clip.texts(["photo of a cat", "a red chair"])
    assert t.shape == (2, 16)
    dino = load_dino(str(tiny_dino))
    if importlib.util.find_spec("torchvision") is None:
        assert type(dino.processor).__name__ == "ViTImageProcessorPil"
    assert dino.images(ims).shape == (3, 32)


def test_model_loading_failures_are_one_clear_error(tmp_path, monkeypatch):
    from cdiff_cli.evaluation.features import load_clip, load_dino

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CdiffError, match="hub is unreachable: pass --clip with a local folder"):
        load_clip("someone/not-a-clip-model")
    with pytest.raises(CdiffError, match="not found"):
        load_clip(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CdiffError, match="no config.json"):
        load_dino(str(tmp_path / "empty"))


def test_training_images_are_found_for_merged_entries_and_missing_for_imported(home, tmp_path):
    from cdiff_cli.core.delta import Delta
    from cdiff_cli.evaluation import concept_sources

    from .conftest import make_images

    imgs = make_images(tmp_path / "imgs", n=2)
    reg = Registry()
    emb = torch.zeros(1, 4)
    concept = {"token": "<a>", "class": "cat", "images_dir": str(imgs), "images": [{"file": "img0.png"}, {"file": "img1.png"}]}
    reg.create("a", Delta({}, ["<a>"], emb), {"kind": "trained", "classes": ["cat"], "concepts": [concept]})
    reg.create("b", Delta({}, ["<b>"], emb), {"kind": "imported", "classes": ["dog"]})
    reg.create("a+b", Delta({}, ["<a>", "<b>"], torch.zeros(2, 4)),
               {"kind": "merged", "classes": ["cat", "dog"], "parents": [{"name": "a"}, {"name": "b"}]})
    sources, notes = concept_sources(reg, reg.get("a+b"))
    assert [(s.token, s.class_word, len(s.files)) for s in sources] == [("<a>", "cat", 2), ("<b>", "dog", 0)]
    assert len(notes) == 1 and "<b>" in notes[0]
    _, notes = concept_sources(reg, reg.get("b"))
    assert "imported entries carry no training images" in notes[0]


# -- end to end ----------------------------------------------------------------------------------------


def test_eval_end_to_end(home, sd1_base, cat_images, tiny_clip, tmp_path):
    cdiff("train", "mycat", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN)
    out = tmp_path / "eval"
    r = cdiff("eval", "mycat", "--clip", tiny_clip, "-n", 1, "--steps", 2, "--max-prompts", 3, "--height", RES,
              "--width", RES, "-o", out, "--json", "--device", "cpu", "--kid-samples", 3)
    res = json.loads(r.stdout)
    for key in ("text_alignment", "image_alignment", "baseline", "kid", "delta", "per_concept", "prompts", "images"):
        assert key in res, key
    assert set(res["baseline"]) >= {"text_alignment", "image_alignment"}
    assert 0 <= res["text_alignment"] <= 2.5 and -1 <= res["image_alignment"] <= 1
    assert res["delta"]["text_alignment"] == pytest.approx(res["text_alignment"] - res["baseline"]["text_alignment"], abs=2e-4)
    assert isinstance(res["kid"], float) and res["forgetting"]["samples_per_class"] == 3
    # The prompts: the concept model sees the token, CLIPScore and the base model do not.
    assert len(res["prompts"]) == 3
    for p in res["prompts"]:
        assert "<mycat> cat" in p["prompt"] and "<mycat>" not in p["text"]
        assert p["text"] == " ".join(p["prompt"].replace("<mycat>", "").split())
        assert len(p["images"]) == 1 and Path(p["images"][0]).is_file()
    assert len(res["images"]["concept"]) == 3 and len(res["images"]["class_base"]) == 3
    assert res["per_concept"][0]["token"] == "<mycat>" and len(res["per_concept"][0]["training_images"]) == 4

    assert (out / "report.html").is_file() and (out / "report.json").is_file()
    page = (out / "report.html").read_text()
    assert "<svg" in page and 'class="scores"' in page and "data:image/png;base64," in page
    # The grid `cdiff train` made at the end is in the report, whole.
    assert res["training_samples"] == str(home / "concepts" / "mycat" / "samples.png")
    assert "Samples made at the end of training" in page and '<img class="grid"' in page
    assert json.loads((out / "report.json").read_text())["entries"][0]["name"] == "mycat"

    shown = json.loads(cdiff("show", "mycat", "--json").stdout)
    m = shown["metrics"]
    assert m["text_alignment"] == res["text_alignment"] and m["models"]["clip"] == str(tiny_clip)
    assert m["settings"]["steps"] == 2 and m["date"] and "CLIP image embeddings" in m["kid_features"]
    assert "text alignment" in cdiff("show", "mycat").stdout
    listing = cdiff("list").stdout
    assert "TEXT" in listing and "IMAGE" in listing and f"{res['text_alignment']:.3f}" in listing
    assert json.loads(cdiff("list", "--json").stdout)[0]["metrics"]["image_alignment"] == res["image_alignment"]


def test_eval_of_a_two_concept_entry_scores_each_concept(home, sd1_base, cat_images, chair_images, tiny_clip, tiny_dino, tmp_path):
    cdiff("train", "pair", "--concept", f"<c1>:cat:{cat_images}", "--concept", f"<c2>:chair:{chair_images}",
          "--base", sd1_base, *TRAIN[2:], "--steps", 1)
    r = cdiff("eval", "pair", "--clip", tiny_clip, "--dino", tiny_dino, "-n", 2, "--steps", 1, "--max-prompts", 2,
              "--height", RES, "--width", RES, "-o", tmp_path / "ev", "--json", "--device", "cpu", "--kid-samples", 2,
              "--no-save")
    res = json.loads(r.stdout)
    assert [c["token"] for c in res["per_concept"]] == ["<c1>", "<c2>"]
    assert all(c["image_alignment"] is not None and c["image_alignment_dino"] is not None for c in res["per_concept"])
    assert res["image_alignment"] == pytest.approx(np.mean([c["image_alignment"] for c in res["per_concept"]]), abs=2e-4)
    assert res["baseline"]["image_alignment_dino"] is not None
    assert all(p["kind"] == "pair" and "<c1> cat" in p["prompt"] and "<c2> chair" in p["prompt"] for p in res["prompts"])
    assert res["prompts"][0]["text"] == "photo of a cat and a chair"
    assert [c["class"] for c in res["forgetting"]["classes"]] == ["cat", "chair"]
    assert "metrics" not in Registry(home).get("pair").manifest  # --no-save


def test_eval_bad_input_is_one_line_and_stores_nothing(home, sd1_base, tmp_path):
    cases = [
        (["eval", "ghost"], "no concept named"),
        (["eval", "mycat", "--kid-samples", "1"], "--kid-samples"),
        (["eval", "mycat", "--clip", "someone/no-such-clip"], "cannot load CLIP model someone/no-such-clip"),
        (["eval", "mycat", "--prompts", str(tmp_path / "nope.txt")], "prompt file not found"),
        (["eval", "mycat", "mycat"], "only once"),
    ]
    from cdiff_cli.core.delta import Delta

    # Every case fails before a base is loaded, so a stand-in entry (no training) is enough.
    Registry().create("mycat", Delta({}, ["<mycat>"], torch.zeros(1, 32)),
                      {"kind": "trained", "classes": ["cat"], "base": {"ref": str(sd1_base)}})
    for args, message in cases:
        r = cdiff(*args, "-o", tmp_path / "ev", "--device", "cpu", ok=False)
        assert r.exit_code != 0 and "Traceback" not in r.output
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], r.stderr
    assert "metrics" not in Registry(home).get("mycat").manifest
