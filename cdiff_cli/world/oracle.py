"""An oracle for the nano world: read a 64 px image back into what is in it (`reading`), and score samples
against prompts.

    reading = read(image)                     # Reading(background='gray', objects=(Seen(kind='star', ...),))
    look = learn_look(training_images)        # Look(kind='star', colour='teal', fill='solid'): what a concept is
    want = parse_prompt("a big <tealstar> star on the left", {"<tealstar>": look})
    score_sample(reading, want)               # {'kind': True, 'size': True, 'position': True, 'concept': True, ...}

`validate` measures the oracle on rendered scenes, optionally blurred (`python -m cdiff_cli.world.oracle [BLUR]`
prints it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from PIL import ImageFilter

from cdiff_cli.world import scenes as W
from cdiff_cli.world.pictures import render
from cdiff_cli.world.reading import Look, Reading, Seen, position_of, read

# -- what a prompt asks for -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Wanted:
    """One object a prompt asks for; None: the prompt does not say."""

    kind: str | None = None
    colour: str | None = None
    fill: str | None = None
    size: str | None = None
    concept: Look | None = None  # the prompt used a concept's token: the concept must appear


@dataclass(frozen=True)
class Prompt:
    """What a world prompt asks for."""

    objects: tuple[Wanted, ...]
    position: str | None = None  # for one object
    relation: str | None = None  # for two objects
    background: str | None = None


_PHRASES = {**{v: k for k, v in W._POSITION_PHRASE.items()}}
_RELATIONS = {v: k for k, v in W._RELATION_PHRASE.items()}


def parse_prompt(text: str, tokens: dict[str, Look] | None = None) -> Prompt | None:
    """Read a prompt in the world's language ("a big red striped square on the left, on a gray background",
    "a <tealstar> star above a blue circle"). `tokens` maps a concept's token to its look. Returns None for
    a prompt that names no world kind (the oracle cannot score it)."""
    tokens = {t.lower(): c for t, c in (tokens or {}).items()}
    text = text.lower().strip()
    background = None
    m = re.search(r",?\s*on an? (\w+) background\s*$", text)
    if m and m.group(1) in W.BACKGROUNDS:
        background, text = m.group(1), text[: m.start()]
    relation = None
    for phrase, rel in sorted(_RELATIONS.items(), key=lambda kv: -len(kv[0])):
        if f" {phrase} " in f" {text} ":
            left, right = text.split(f" {phrase} ", 1) if f" {phrase} " in text else (text, "")
            if _object(left, tokens) and _object(right, tokens):
                relation, parts = rel, [left, right]
                break
    position = None
    if relation is None:
        for phrase, pos in _PHRASES.items():
            if text.endswith(" " + phrase):
                position, text = pos, text[: -len(phrase)].strip()
                break
        parts = [text]
    objects = tuple(_object(p, tokens) for p in parts)
    if not all(objects):
        return None
    return Prompt(objects, position, relation, background)


def _object(text: str, tokens: dict[str, Look]) -> Wanted | None:
    words = text.replace(",", " ").split()
    look = next((tokens[w] for w in words if w in tokens), None)
    if look is not None:
        return Wanted(look.kind, look.colour, look.fill, _word(words, W.SIZES), look)
    kinds = [w for w in words if w in W.KINDS]
    if not kinds:
        return None
    fill = _word(words, W.FILLS)
    colour = _word(words, W.COLOURS)
    # A named colour with no fill word is a solid object (the world's captions name every pattern).
    return Wanted(kinds[-1], colour, fill or ("solid" if colour else None), _word(words, W.SIZES))


def _word(words, vocabulary) -> str | None:
    return next((w for w in words if w in vocabulary), None)


# -- scoring -------------------------------------------------------------------------------------------

ATTRIBUTES = ("kind", "colour", "fill", "size", "position", "relation", "background", "count")


def _match(seen: Seen | None, want: Wanted) -> dict[str, bool]:
    """Per attribute the object states: is it what the read object shows? Also "object" (its kind, colour
    and fill), and "concept" or "plain_object" (the same, for a concept or for an ordinary object)."""
    out = {a: seen is not None and getattr(seen, a) == getattr(want, a)
           for a in ("kind", "colour", "fill", "size") if getattr(want, a) is not None}
    right = all(v for k, v in out.items() if k != "size")
    out["object"] = right
    out["concept" if want.concept is not None else "plain_object"] = right
    return out


def _both(a: dict[str, bool], b: dict[str, bool]) -> dict[str, bool]:
    """Two objects' matches combined: an attribute is right when it is right wherever it is stated."""
    return {k: a.get(k, True) and b.get(k, True) for k in {**a, **b}}


def score_sample(reading: Reading, prompt: Prompt) -> dict[str, bool]:
    """Which of the prompt's attributes the image shows: {attribute: bool} for each attribute the prompt
    states (kind, colour, fill, size, position or relation, background), "count" (as many objects as asked),
    "object" (every object's kind, colour and fill right), "concept" (every concept object right) and
    "plain_object" (every other object right). Asked objects are paired with the largest read ones, in
    whichever order matches more."""
    out: dict[str, bool] = {"count": len(reading.objects) == len(prompt.objects)}
    if prompt.background is not None:
        out["background"] = reading.background == prompt.background
    want, seen = prompt.objects, reading.objects[:2]
    if len(want) == 1:
        best = max(seen, key=lambda s: sum(_match(s, want[0]).values()), default=None)
        out.update(_match(best, want[0]))
        if prompt.position is not None:
            out["position"] = best is not None and best.position == prompt.position
        return out
    if len(seen) < 2:
        out.update(_both(_match(None, want[0]), _match(None, want[1])))
        return {**out, **({"relation": False} if prompt.relation else {})}
    pairs = [(i, j, _match(seen[i], want[0]), _match(seen[j], want[1])) for i, j in ((0, 1), (1, 0))]
    i, j, a, b = max(pairs, key=lambda p: sum(p[2].values()) + sum(p[3].values()))
    out.update(_both(a, b))
    if prompt.relation is not None:
        out["relation"] = reading.relation(i, j) == prompt.relation
    return out


def concept_present(reading: Reading, look: Look) -> bool:
    """Does any object in the image look like the concept (its kind, colour and fill)?"""
    return any(s.look == look for s in reading.objects)


def learn_look(images) -> Look | None:
    """A concept's look from its training images: the look of the largest object that most of them show
    (None when no look is read in at least half of them: not a world concept)."""
    images = list(images)
    looks = [r.objects[0].look for r in map(read, images) if r.objects]
    if not looks:
        return None
    best = max(set(looks), key=looks.count)
    return best if looks.count(best) * 2 >= len(images) else None


@dataclass
class Tally:
    """Shares of samples right, per attribute."""

    right: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)

    def add(self, scores: dict[str, bool]) -> None:
        for k, v in scores.items():
            self.total[k] = self.total.get(k, 0) + 1
            self.right[k] = self.right.get(k, 0) + int(bool(v))

    def share(self, key: str) -> float | None:
        return self.right.get(key, 0) / self.total[key] if self.total.get(key) else None

    def shares(self) -> dict[str, float]:
        return {k: self.right.get(k, 0) / n for k, n in self.total.items()}


# -- validation on rendered scenes ----------------------------------------------------------------------


def truth(spec: W.SceneSpec) -> Reading:
    """What the oracle should read from `world.render(spec)`: largest object first, like `read`."""
    objs = []
    for o in spec.objects:
        pos = o.position if len(spec.objects) == 1 else position_of(o.x, o.y)
        objs.append(Seen(o.kind, o.colour, o.fill, o.size, pos, o.x, o.y, o.r, 0, 1.0))
    return Reading(spec.background, tuple(objs))


def validate(n: int = 1000, seed: int = 12345, per_concept: int = 25, blur: float = 0.0) -> dict[str, dict[str, float]]:
    """The oracle's accuracy on rendered scenes: {"scenes": {attribute: share read right} over `n` scenes
    of the base world (objects matched by position), "concepts": {name: share of photos whose look is the
    concept's}, "pairs": {"a+b": share of two-concept scenes where both are read}}. `blur`: a Gaussian
    blur radius (pixels at 64 px) applied first, to read pictures as soft as generated ones."""
    def picture(spec):
        im = render(spec)
        return im.filter(ImageFilter.GaussianBlur(blur)) if blur else im

    t = Tally()
    for spec in W.dataset_specs(n, seed=seed):
        got, want = read(picture(spec)), truth(spec)
        t.add({"background": got.background == want.background, "count": len(got.objects) == len(want.objects)})
        for w in want.objects:
            g = min(got.objects, key=lambda s: (s.x - w.x) ** 2 + (s.y - w.y) ** 2, default=None)
            for a in ("kind", "colour", "fill", "size", "position"):
                t.add({a: g is not None and getattr(g, a) == getattr(w, a)})
        if len(want.objects) == 2 and len(got.objects) == 2:
            t.add({"relation": got.relation(*_order(got, want)) == spec.relation})
    concepts = {name: float(np.mean([concept_present(read(picture(sp)), Look.of(c))
                                     for sp in W.concept_specs(name, per_concept, seed=seed)]))
                for name, c in W.CONCEPTS.items()}
    pairs = {}
    for a, b in W.CONCEPT_PAIRS:
        ok = [all(concept_present(r, Look.of(W.CONCEPTS[x])) for x in (a, b))
              for r in (read(picture(sp)) for sp in W.concept_pair_specs(a, b, per_concept, seed=seed))]
        pairs[f"{a}+{b}"] = float(np.mean(ok))
    return {"scenes": t.shares(), "concepts": concepts, "pairs": pairs}


def scenes_for(prompt: Prompt, concepts: tuple[str, ...], n: int, seed: int = 0, tries: int = 200_000) -> list[W.SceneSpec]:
    """`n` scenes the world itself draws for `prompt`: random scenes with the prompt's object count and background
    that hold `concepts` (world names), kept when their truth shows everything the prompt asks (what a perfect
    generator could draw). `ValueError` when `tries` scenes yield fewer than `n`."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(tries):
        spec = W.sample_scene(rng, n_objects=len(prompt.objects), concepts=concepts, caption_variety=False,
                              background=prompt.background)
        if all(score_sample(truth(spec), prompt).values()):
            out.append(spec)
            if len(out) == n:
                return out
    raise ValueError(f"only {len(out)} of {n} scenes in {tries} tries match the prompt")


def _order(got: Reading, want: Reading) -> tuple[int, int]:
    w0 = want.objects[0]
    d = [(s.x - w0.x) ** 2 + (s.y - w0.y) ** 2 for s in got.objects[:2]]
    return (0, 1) if d[0] <= d[1] else (1, 0)


if __name__ == "__main__":
    import sys

    blur = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0  # python -m cdiff_cli.world.oracle [BLUR]
    for group, shares in validate(blur=blur).items():
        print(group)
        for k, v in shares.items():
            print(f"  {k:24s} {100 * v:5.1f} %")
