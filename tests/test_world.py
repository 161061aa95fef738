"""The procedural world of cdiff_cli.world: deterministic, captioned truthfully, novel concepts kept apart."""

import numpy as np
import pytest
from PIL import Image

from cdiff_cli import world as W


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_the_world_is_deterministic_from_a_seed():
    a, b = W.dataset_specs(30, seed=7), W.dataset_specs(30, seed=7)
    assert a == b
    assert a != W.dataset_specs(30, seed=8)
    pa, pb = W.dataset(12, seed=7), W.dataset(12, seed=7)
    assert [c for _, c in pa] == [c for _, c in pb]
    assert all(np.array_equal(pixels(x), pixels(y)) for (x, _), (y, _) in zip(pa, pb))
    assert all(im.size == (64, 64) and im.mode == "RGB" for im, _ in pa)
    assert W.render(a[0], size=32).size == (32, 32)
    c1, c2 = W.concept_images("heart", 4, seed=1), W.concept_images("heart", 4, seed=1)
    assert all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(c1, c2))


def test_the_world_varies():
    specs = W.dataset_specs(400, seed=0)
    assert {k for s in specs for k in s.kinds} == set(W.KINDS)
    assert {o.colour for s in specs for o in s.objects} == set(W.COLOURS)
    assert {s.background for s in specs} == set(W.BACKGROUNDS)
    assert {s.texture for s in specs} == set(W.TEXTURES)
    assert {o.position for s in specs for o in s.objects if len(s.objects) == 1} == set(W.POSITIONS)
    assert {s.relation for s in specs if len(s.objects) == 2} == set(W.RELATIONS)
    assert {len(s.objects) for s in specs} == {1, 2}
    assert {o.size for s in specs for o in s.objects} == set(W.SIZES)
    assert len({W.caption(s) for s in specs}) > 390


def test_captions_describe_their_scenes():
    for spec in W.dataset_specs(300, seed=1):
        text = W.caption(spec)
        words = text.replace(",", " ").split()
        assert set(words) <= set(W.WORDS), text
        for obj, generic, size in zip(spec.objects, spec.generic, spec.mention_size):
            assert obj.colour in words and (W.GENERIC if generic else obj.kind) in words, text
            if size:
                assert obj.size in words, text
        if spec.mention_background:
            assert f"{spec.background} background" in text
            assert (spec.texture in words) == (spec.texture != "plain"), text
        if len(spec.objects) == 1:
            assert {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "middle": "in the middle"}[spec.objects[0].position] in text
        else:
            assert {"left of": "on the left of", "right of": "on the right of", "above": " above ",
                    "below": " below "}[spec.relation] in text
        assert not any(f" a {w}" in f" {text}" for w in ("orange", "image")), text  # "an orange", "an image"


def test_full_captions_and_positions_agree_with_the_pixels():
    rng = np.random.default_rng(3)
    for _ in range(40):
        spec = W.sample_scene(rng, n_objects=1, caption_variety=False)
        text = W.caption(spec)
        obj = spec.objects[0]
        assert text.startswith(f"a {obj.size} {obj.colour} {obj.kind}") or text.startswith(f"an {obj.size}")
        assert text.endswith("background")
        # The object's colour is where the caption says it is.
        px = pixels(W.render(spec)).astype(float)
        close = np.abs(px - np.array(obj.rgb)).sum(-1) < 40
        ys, xs = np.nonzero(close)
        assert len(xs) > 20, text
        cx, cy = xs.mean() / 64, ys.mean() / 64
        if obj.position == "left":
            assert cx < 0.4, text
        if obj.position == "right":
            assert cx > 0.6, text
        if obj.position == "top":
            assert cy < 0.4, text
        if obj.position == "bottom":
            assert cy > 0.6, text
    rng = np.random.default_rng(4)
    for _ in range(20):
        spec = W.sample_scene(rng, n_objects=2, caption_variety=False)
        a, b = spec.objects
        if spec.relation == "left of":
            assert a.x < b.x
        elif spec.relation == "right of":
            assert a.x > b.x
        elif spec.relation == "above":
            assert a.y < b.y
        else:
            assert a.y > b.y


def test_novel_concepts_never_appear_in_the_base_data():
    assert len(W.CONCEPTS) >= 4
    for name, c in W.CONCEPTS.items():
        assert name not in W.WORDS and name not in W.KINDS
        assert c.class_word in W.WORDS  # the class word is something the base knows
    specs = W.dataset_specs(3000, seed=11)
    assert not any(o.is_concept for s in specs for o in s.objects)
    texts = " ".join(W.caption(s) for s in specs[:1000])
    assert not any(f" {name} " in f" {texts} " for name in W.CONCEPTS)
    with pytest.raises(ValueError):
        W.sample_scene(np.random.default_rng(0), allow=["square", "dragon"])
    # A concept can be asked for explicitly (for scenes that show it), and is captioned with its class word.
    spec = W.sample_scene(np.random.default_rng(0), allow=["heart"], n_objects=1)
    assert spec.objects[0].is_concept and "heart shape" in W.caption(spec)
    assert "<new1> shape" in W.caption(spec, tokens={"heart": "<new1>"})


@pytest.mark.parametrize("name", sorted(W.CONCEPTS))
def test_concept_images_vary_and_show_the_concept(name):
    ims = W.concept_images(name, 6, seed=0)
    assert len(ims) == 6 and all(im.size == (64, 64) for im in ims)
    arr = [pixels(im) for im in ims]
    for i in range(len(arr)):
        for j in range(i + 1, len(arr)):
            assert np.abs(arr[i] - arr[j]).mean() > 5, (i, j)
    specs = W.concept_specs(name, 6, seed=0)
    assert len({o.position for s in specs for o in s.objects}) >= 4
    assert {o.size for s in specs for o in s.objects} == set(W.SIZES)
    assert len({s.background for s in specs}) >= 3
    # Every image shows the concept's own colouring.
    colours = W.CONCEPTS[name].colours
    for a in arr:
        for rgb in colours:
            assert (np.abs(a - np.array(rgb)).sum(-1) < 30).sum() >= 3, (name, rgb)
    assert W.concept_images(name, 4, seed=1) != ims[:4]
    assert len(W.concept_images(name, 8, seed=2)) == 8


def test_concept_pairs_and_pair_scenes():
    assert len(W.CONCEPT_PAIRS) >= 2
    for a, b in W.CONCEPT_PAIRS:
        assert a in W.CONCEPTS and b in W.CONCEPTS and a != b
    a, b = W.CONCEPT_PAIRS[0]
    spec = W.concept_pair_specs(a, b, 2, seed=0)[0]
    assert spec.kinds == (a, b)
    text = W.caption(spec, tokens={a: "<a>", b: "<b>"})
    assert f"<a> {W.CONCEPTS[a].class_word}" in text and f"<b> {W.CONCEPTS[b].class_word}" in text
    assert W.render(spec).size == (64, 64)


def test_every_world_word_is_one_token(tmp_path):
    from transformers import CLIPTokenizer

    from cdiff_cli.nano import write_word_tokenizer

    tok = CLIPTokenizer.from_pretrained(str(write_word_tokenizer(tmp_path / "tok", W.WORDS)), model_max_length=32)
    for w in W.WORDS:
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
    text = W.caption(W.dataset_specs(1, seed=0)[0])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.replace(",", " ,").split())
    assert tok.decode(ids) == text.replace(",", " ,") or tok.decode(ids).replace(" ,", ",") == text


def test_object_mask_covers_exactly_where_the_objects_are_drawn():
    """scripts/train_nano.py weights the VAE loss with these masks (they reproduce the shipped run's)."""
    from dataclasses import replace

    for spec in W.dataset_specs(20, seed=3):
        mask = np.asarray(W.object_mask(spec))
        drawn = np.asarray(W.render(spec)).astype(int)
        background = np.asarray(W.render(replace(spec, objects=()))).astype(int)
        change = np.abs(drawn - background).max(-1)
        assert mask.max() == 255 and (mask > 0).sum() < mask.size
        near = mask > 0  # grown by one pixel: Lanczos downsampling rings one pixel past an edge
        near = near | np.roll(near, 1, 0) | np.roll(near, -1, 0) | np.roll(near, 1, 1) | np.roll(near, -1, 1)
        assert change[~near].max() <= 1  # nothing drawn away from the mask
        assert change[mask > 128].mean() > 50  # and the objects are drawn inside it
