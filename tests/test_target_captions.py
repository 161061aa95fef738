"""Captions beside target photos (`NAME.txt`, as kohya reads them): where the token goes, what training
encodes, what the entry records, and that the merge holds the concept in those captions too."""

import pytest
import torch

from cdiff_cli.core import textcond
from cdiff_cli.core.layers import kv_names
from cdiff_cli.core.prompts import own_caption
from cdiff_cli.merging import concept_prompts, merge_deltas, prompt_features
from cdiff_cli.registry import Registry
from cdiff_cli.testing.tiny import build_tiny_pipeline

from .test_cli import TRAIN, cdiff
from .test_merge import _synthetic_delta


def test_own_caption_puts_the_token_where_it_is_marked():
    assert own_caption("a {token} cat on a sofa", "<mycat>") == "a <mycat> cat on a sofa"
    assert own_caption("  a <MyCat>  cat\n asleep ", "<mycat>") == "a <MyCat> cat asleep"  # the tokenizer lowercases
    assert own_caption("a cat on a sofa", "<mycat>") is None


def test_training_encodes_each_photo_with_its_own_caption(home, sd1_base, cat_images, monkeypatch):
    (cat_images / "img0.txt").write_text("a {token} cat on a red sofa\n", encoding="utf-8")
    (cat_images / "img1.txt").write_text("close up of <mycat> cat", encoding="utf-8")
    seen = []
    encode = textcond.encode

    def spy(pipe, prompts, *args, **kwargs):
        seen.extend(prompts)
        return encode(pipe, prompts, *args, **kwargs)

    monkeypatch.setattr(textcond, "encode", spy)
    cdiff("train", "mycat", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN, "--steps", "8", "--no-aug")
    assert "a <mycat> cat on a red sofa" in seen and "close up of <mycat> cat" in seen
    assert "photo of a <mycat> cat" in seen  # img2 and img3 have no caption file
    entry = Registry(home).get("mycat")
    assert entry.captions == [["a <mycat> cat on a red sofa", "close up of <mycat> cat"]]


def test_a_caption_without_the_token_is_refused_naming_its_file(home, sd1_base, cat_images):
    (cat_images / "img2.txt").write_text("a cat on a red sofa", encoding="utf-8")
    r = cdiff("train", "mycat", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN, ok=False)
    assert r.exit_code == 1
    assert "img2.txt" in r.output and "{token}" in r.output and "Traceback" not in r.output
    assert not Registry(home).exists("mycat")


def test_the_merge_holds_each_concept_in_its_own_captions():
    pipe = build_tiny_pipeline("sd1")
    G = torch.eye(pipe.text_encoder.config.hidden_size, dtype=torch.float64)
    d1, d2 = _synthetic_delta(pipe, "<a1>", 1), _synthetic_delta(pipe, "<b2>", 2)
    caption = "a <a1> cat asleep"
    with_caps, _ = merge_deltas(pipe, [d1, d2], [["cat"], ["chair"]], G=G, ridge=1e-5, captions=[[[caption]], [[]]])
    without, _ = merge_deltas(pipe, [d1, d2], [["cat"], ["chair"]], G=G, ridge=1e-5)
    rows = torch.cat(prompt_features(pipe, [caption]))
    assert caption in concept_prompts("<a1>", "cat", [caption])
    errors = {}
    for label, merged in (("with", with_caps), ("without", without)):
        errors[label] = max(float((rows @ merged.weights[n].T - rows @ d1.weights[n].T).abs().max()
                                  / (rows @ d1.weights[n].T).abs().max()) for n in kv_names(merged.weights))
    assert errors["with"] < 1e-3, errors
    assert errors["without"] > 10 * errors["with"], errors


@pytest.mark.parametrize("raw", [None, "not a list", [["ok"], 3]])
def test_an_entry_reads_damaged_captions_as_none(tmp_path, raw):
    from cdiff_cli.registry import Entry

    manifest = {"tokens": ["<a>", "<b>"]}
    if raw is not None:
        manifest["captions"] = raw
    captions = Entry("x", tmp_path, manifest).captions
    assert len(captions) == 2 and all(isinstance(c, list) for c in captions)
