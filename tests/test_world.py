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
    c1, c2 = W.concept_images("tealstar", 4, seed=1), W.concept_images("tealstar", 4, seed=1)
    assert all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(c1, c2))


def test_the_world_varies():
    specs = W.dataset_specs(600, seed=0)
    objects = [o for s in specs for o in s.objects]
    assert {o.kind for o in objects} == set(W.KINDS)
    assert {o.colour for o in objects} == set(W.PALETTE)  # the unnamed colours too
    assert {o.fill for o in objects} == set(W.FILLS)
    assert {s.background for s in specs} == set(W.BACKGROUNDS)
    assert {o.position for s in specs for o in s.objects if len(s.objects) == 1} == set(W.POSITIONS)
    assert {s.relation for s in specs if len(s.objects) == 2} == set(W.RELATIONS)
    assert {len(s.objects) for s in specs} == {1, 2}
    assert {o.size for o in objects} == set(W.SIZES)
    assert len({W.caption(s) for s in specs}) > 500
    # Unnamed colours are rare (the base can draw them, but a class prompt seldom gives one).
    assert 0.02 < np.mean([o.colour in W.UNNAMED for o in objects]) < 0.1


def test_nothing_is_drawn_where_it_would_not_show():
    for spec in W.dataset_specs(800, seed=2):
        for o in spec.objects:
            assert o.colour != spec.background
            if o.fill != "solid":
                assert W.pattern_colour(o.colour) != spec.background and o.colour not in ("white", "black")


def test_captions_describe_their_scenes():
    for spec in W.dataset_specs(400, seed=1):
        text = W.caption(spec)
        words = text.replace(",", " ").split()
        assert set(words) <= set(W.WORDS), text
        for obj, m in zip(spec.objects, spec.mentions):
            phrase = W.describe(obj, m)
            assert phrase in text
            said = phrase.split()
            assert said[-1] == obj.kind, text
            assert (obj.colour in said) == (m.colour and obj.colour in W.COLOURS), text
            assert not set(said) & set(W.UNNAMED)
            assert (obj.fill in said) == (obj.fill != "solid" and m.fill), text
            assert (obj.size in said) == m.size, text
        if spec.mention_background:
            assert text.endswith(f"{spec.background} background")
        if len(spec.objects) == 1 and spec.mentions[0].position:
            assert {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "middle": "in the middle"}[spec.objects[0].position] in text
        if len(spec.objects) == 2:
            assert {"left of": "on the left of", "right of": "on the right of", "above": " above ",
                    "below": " below "}[spec.relation] in text
        assert " a a" not in f" {text}" and not any(f" a {w}" in f" {text}" for w in ("orange",)), text


def test_full_captions_and_positions_agree_with_the_pixels():
    rng = np.random.default_rng(3)
    for _ in range(40):
        spec = W.sample_scene(rng, n_objects=1, caption_variety=False)
        text = W.caption(spec)
        obj = spec.objects[0]
        assert text.startswith(f"a {obj.size} ")
        assert text.endswith("background")
        # The object's colour is where the caption says it is.
        px = pixels(W.render(spec)).astype(float)
        close = np.abs(px - np.array(obj.rgb)).sum(-1) < 40
        ys, xs = np.nonzero(close)
        assert len(xs) > 20, text
        cx, cy = xs.mean() / 64, ys.mean() / 64
        if obj.position == "left":
            assert cx < 0.42, text
        if obj.position == "right":
            assert cx > 0.58, text
        if obj.position == "top":
            assert cy < 0.42, text
        if obj.position == "bottom":
            assert cy > 0.58, text
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


def test_concepts_are_unnamed_instances_of_known_kinds():
    assert len(W.CONCEPTS) >= 4
    for name, c in W.CONCEPTS.items():
        assert name not in W.WORDS
        assert c.class_word in W.KINDS  # an instance of a class the base draws
        assert c.colour in W.UNNAMED  # in a colour no caption names
        assert c.fill in W.FILLS and (c.fill == "solid") == (c.second == "")
    assert len({c.class_word for c in W.CONCEPTS.values()}) == len(W.CONCEPTS)
    specs = W.dataset_specs(3000, seed=11)
    assert not any(o.is_concept for s in specs for o in s.objects)
    # No base object has a concept's whole look (kind, colour and fill) named in its caption: the look has no words.
    texts = " ".join(W.caption(s) for s in specs[:1000])
    assert not any(f" {c.colour} " in f" {texts} " for c in W.CONCEPTS.values())
    with pytest.raises(ValueError):
        W.sample_scene(np.random.default_rng(0), concepts=("dragon",))
    spec = W.sample_scene(np.random.default_rng(0), concepts=("tealstar",), n_objects=1)
    assert spec.objects[0].is_concept and spec.objects[0].colour == "teal" and spec.objects[0].kind == "star"
    assert "teal" not in W.caption(spec) and " star" in W.caption(spec)
    assert "<new1> star" in W.caption(spec, tokens={"tealstar": "<new1>"})


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
    shown = [b for b in W.BACKGROUNDS if b not in (W.CONCEPTS[name].colour, W.CONCEPTS[name].second)]
    assert {s.background for s in specs} == set(shown)  # every background the concept shows on
    c = W.CONCEPTS[name]
    for spec, a in zip(specs, arr):
        assert spec.background not in (c.colour, c.second)
        for colour in (c.colour, c.second or c.colour):
            assert (np.abs(a - np.array(W.PALETTE[colour])).sum(-1) < 60).sum() >= 3, (name, colour)
    assert W.concept_images(name, 4, seed=1) != ims[:4]
    assert len(W.concept_images(name, 8, seed=2)) == 8
    # Size and background vary apart: twice as many photos as backgrounds show each background at both sizes.
    for seed in (0, 3):
        pairs = [(s.background, s.objects[0].size) for s in W.concept_specs(name, 2 * len(shown), seed=seed)]
        assert set(pairs) == {(b, z) for b in shown for z in W.SIZES}, pairs


def test_concept_pairs_and_pair_scenes():
    assert len(W.CONCEPT_PAIRS) >= 2
    for a, b in W.CONCEPT_PAIRS:
        assert a in W.CONCEPTS and b in W.CONCEPTS and W.CONCEPTS[a].class_word != W.CONCEPTS[b].class_word
    a, b = W.CONCEPT_PAIRS[0]
    spec = W.concept_pair_specs(a, b, 2, seed=0)[0]
    assert tuple(o.concept for o in spec.objects) == (a, b)
    text = W.caption(spec, tokens={a: "<a>", b: "<b>"})
    assert f"<a> {W.CONCEPTS[a].class_word}" in text and f"<b> {W.CONCEPTS[b].class_word}" in text
    assert W.render(spec).size == (64, 64)


def test_every_world_word_is_one_token(tmp_path):
    from transformers import CLIPTokenizer

    from cdiff_cli.models.packaged import write_word_tokenizer

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
