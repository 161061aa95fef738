"""A procedural, captioned image world: one or two shapes on a plain background, deterministic from a seed.

It is small enough to train a real text-to-image model on a CPU (see `scripts/train_nano.py` and the
packaged `--base nano`), and its factors are few and clean so that such a model can draw what a caption
says: 6 kinds, 6 named colours, 3 fills (solid, striped, dotted), 2 sizes, 5 positions, 5 backgrounds.

Concepts are like the paper's: a particular instance of a class the base already draws (a particular
star, a particular square), coloured in a way that no caption word names. The world also paints a few
objects in UNNAMED colours (pink, teal, orange, brown) whose captions leave the colour out ("a big star
at the top"), so the base can render those colours without a word for them; a concept is one fixed
colouring of one kind (a teal star; a pink square with black stripes) that `cdiff train` must learn.

    rng = numpy.random.default_rng(0)
    spec = sample_scene(rng)
    image, text = render(spec), caption(spec)   # 64x64 RGB, "a big red striped square on the left, on a gray background"
    pairs = dataset(1000, seed=0)               # [(image, caption)] of the base world
    imgs = concept_images("tealstar", 6)        # one concept's training photos, in varied scenes

Everything random lives in the `SceneSpec` (exact positions, colour jitter, what the caption mentions),
so `caption` (here) and `render` (`cdiff_cli.world.pictures`) are pure functions of it.
`cdiff_cli.world.oracle` reads a scene back from pixels.
Pure PIL and numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import numpy as np

# -- the vocabulary of the world ---------------------------------------------------------------------

KINDS = ("circle", "square", "triangle", "star", "heart", "cross")
# Colours that captions name.
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 80, 220),
    "yellow": (240, 215, 40),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
# Colours that objects may have but no caption names (the caption leaves the colour out).
UNNAMED = {
    "pink": (245, 120, 190),
    "teal": (30, 170, 170),
    "orange": (245, 140, 30),
    "brown": (130, 80, 40),
}
PALETTE = {**COLOURS, **UNNAMED}
BACKGROUNDS = {
    "gray": (128, 128, 128),
    "white": (230, 230, 230),
    "black": (35, 35, 35),
    "blue": (60, 90, 170),
    "green": (60, 130, 70),
}
FILLS = ("solid", "striped", "dotted")
SIZES = ("small", "big")
POSITIONS = ("left", "right", "top", "bottom", "middle")
RELATIONS = ("left of", "right of", "above", "below")
PREFIXES = ("a photo of", "a picture of")
_LIGHT = {"white", "yellow", "pink", "orange"}  # a pattern on these is drawn in black, on the others in white
# White and black objects are always solid: white with black stripes and black with white stripes would differ
# only by which colour covers more.
SOLID_ONLY = {"white", "black"}

_POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "middle": "in the middle"}
_RELATION_PHRASE = {"left of": "on the left of", "right of": "on the right of", "above": "above", "below": "below"}
CENTRES = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7), "middle": (0.5, 0.5)}
_PAIR_CENTRES = {"left": (0.26, 0.5), "right": (0.74, 0.5), "top": (0.5, 0.26), "bottom": (0.5, 0.74)}
# Radius (fraction of the image side) of each size, as (low, high); smaller when two objects share a scene.
RADIUS = {"small": (0.13, 0.16), "big": (0.22, 0.26)}
RADIUS_PAIR = {"small": (0.13, 0.15), "big": (0.18, 0.20)}
# How often a caption mentions each attribute (when the caption varies), and the scene mix.
_MENTION = {"size": 0.8, "colour": 0.85, "fill": 0.9, "position": 0.85, "background": 0.8, "prefix": 0.25}
_P_UNNAMED = 0.06  # share of objects in an unnamed colour
_P_FILL = {"solid": 0.6, "striped": 0.2, "dotted": 0.2}
_P_TWO = 0.35  # share of scenes with two objects


def pattern_colour(colour: str) -> str:
    """The colour of the stripes or dots on an object of `colour` (black on light colours, else white)."""
    return "black" if colour in _LIGHT else "white"


@dataclass(frozen=True)
class Concept:
    """A particular instance of a known kind: one fixed colouring that no caption word names."""

    name: str
    kind: str  # the class word, a KINDS name
    colour: str  # a PALETTE name
    fill: str = "solid"
    second: str = ""  # the pattern's colour ("" for solid)
    description: str = ""

    @property
    def class_word(self) -> str:
        return self.kind


CONCEPTS: dict[str, Concept] = {
    c.name: c
    for c in (
        Concept("tealstar", "star", "teal", description="a teal star"),
        Concept("pinksquare", "square", "pink", "striped", "black", "a pink square with black stripes"),
        Concept("orangeheart", "heart", "orange", "dotted", "black", "an orange heart with black dots"),
        Concept("browncircle", "circle", "brown", description="a brown circle"),
    )
}
# Pairs of concepts for multi-concept composition: each pair has two different class words.
CONCEPT_PAIRS: tuple[tuple[str, str], ...] = (("tealstar", "pinksquare"), ("orangeheart", "browncircle"),
                                              ("tealstar", "browncircle"), ("pinksquare", "orangeheart"))

# Extra words that prompts around the world use (Custom Diffusion's augmentation prefixes, prompt templates).
_PROMPT_WORDS = ("photo", "far", "away", "very", "zoomed", "close", "up", "and", "with", "next", "to")


@cache
def _words() -> tuple[str, ...]:
    words: list[str] = []
    for chunk in ([*PREFIXES, "a an on"], SIZES, COLOURS, BACKGROUNDS, KINDS, FILLS[1:], _POSITION_PHRASE.values(),
                  _RELATION_PHRASE.values(), ["background"], _PROMPT_WORDS):
        for phrase in chunk:
            for w in phrase.split():
                if w not in words:
                    words.append(w)
    return tuple(words)


WORDS: tuple[str, ...] = _words()


# -- scene specs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """One object: x, y, r are fractions of the image side; `concept` names the concept it is, if any."""

    kind: str
    colour: str  # a PALETTE name
    fill: str
    size: str
    x: float
    y: float
    r: float
    rgb: tuple[int, int, int] = (0, 0, 0)  # the jittered colour actually drawn
    position: str = ""  # where it is, for a single object: one of POSITIONS
    concept: str = ""
    phase: float = 0.0  # pattern offset, as a fraction of the pattern's period

    @property
    def is_concept(self) -> bool:
        return bool(self.concept)

    @property
    def second(self) -> str:
        """The colour of its stripes or dots ("" when solid)."""
        if self.fill == "solid":
            return ""
        return CONCEPTS[self.concept].second if self.concept else pattern_colour(self.colour)


@dataclass(frozen=True)
class Mentions:
    """What a caption says about an object (the rest is left to the reader)."""

    size: bool = True
    colour: bool = True
    fill: bool = True
    position: bool = True


@dataclass(frozen=True)
class SceneSpec:
    """A whole scene and how its caption is phrased."""

    objects: tuple[ObjectSpec, ...]
    background: str
    relation: str = ""  # for two objects: one of RELATIONS, objects[0] relative to objects[1]
    bg_rgb: tuple[int, int, int] = (128, 128, 128)
    prefix: str = ""
    mentions: tuple[Mentions, ...] = ()
    mention_background: bool = True

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(o.kind for o in self.objects)


def _jitter(rgb, rng: np.random.Generator, amount: int = 10) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _clashes(colour: str, fill: str, background: str) -> bool:
    """Would the object (or its pattern) hardly show on this background?"""
    if colour == background:
        return True
    return fill != "solid" and pattern_colour(colour) == background


def _pick(rng: np.random.Generator, options, weights=None):
    options = list(options)
    if weights is None:
        return options[int(rng.integers(len(options)))]
    p = np.asarray(weights, float)
    return options[int(rng.choice(len(options), p=p / p.sum()))]


def sample_object(rng: np.random.Generator, kind: str, *, position: str, size: str | None = None,
                  colour: str | None = None, fill: str | None = None, background: str = "gray", pair: bool = False,
                  centre: tuple[float, float] | None = None, concept: str = "", unnamed: float = _P_UNNAMED) -> ObjectSpec:
    """An object of `kind` at a named position (random size, colour and fill unless given, never one that
    clashes with the background; an unnamed colour with probability `unnamed`). With `concept`, kind,
    colour and fill are the concept's."""
    size = size or _pick(rng, SIZES)
    lo, hi = (RADIUS_PAIR if pair else RADIUS)[size]
    r = float(rng.uniform(lo, hi))
    if centre is None:
        cx, cy = CENTRES[position]
        cx, cy = cx + rng.uniform(-0.04, 0.04), cy + rng.uniform(-0.04, 0.04)
    else:
        cx, cy = centre
    cx, cy = float(np.clip(cx, r + 0.02, 0.98 - r)), float(np.clip(cy, r + 0.02, 0.98 - r))
    if concept:
        c = CONCEPTS[concept]
        kind, colour, fill = c.kind, c.colour, c.fill
    else:
        fill = fill or _pick(rng, _P_FILL, list(_P_FILL.values()))
        if colour is None:
            pool = UNNAMED if rng.random() < unnamed else COLOURS
            choices = [c for c in pool if not _clashes(c, fill, background)]
            colour = _pick(rng, choices)
        if colour in SOLID_ONLY:
            fill = "solid"
    return ObjectSpec(kind, colour, fill, size, cx, cy, r, _jitter(PALETTE[colour], rng), position, concept,
                      float(rng.random()))


def _pair_objects(rng, picks, relation, background, concepts, unnamed) -> tuple[ObjectSpec, ...]:
    first, second = {"left of": ("left", "right"), "right of": ("right", "left"),
                     "above": ("top", "bottom"), "below": ("bottom", "top")}[relation]
    along = rng.uniform(0.42, 0.58, size=2)
    objs = []
    for kind, where, a, concept in zip(picks, (first, second), along, concepts):
        cx, cy = _PAIR_CENTRES[where]
        cx, cy = (cx + rng.uniform(-0.03, 0.03), a) if where in ("left", "right") else (a, cy + rng.uniform(-0.03, 0.03))
        objs.append(sample_object(rng, kind, position=where, background=background, pair=True, centre=(cx, cy),
                                  concept=concept, unnamed=unnamed))
    return tuple(objs)


def _mentions(rng, objects, caption_variety: bool) -> tuple[str, tuple[Mentions, ...], bool]:
    if not caption_variety:
        return "", tuple(Mentions() for _ in objects), True
    m = _MENTION
    prefix = _pick(rng, PREFIXES) if rng.random() < m["prefix"] else ""
    mentions = tuple(Mentions(bool(rng.random() < m["size"]), bool(rng.random() < m["colour"]),
                              bool(rng.random() < m["fill"]), bool(rng.random() < m["position"])) for _ in objects)
    return prefix, mentions, bool(rng.random() < m["background"])


def sample_scene(rng: np.random.Generator, *, n_objects: int | None = None, concepts: tuple[str, ...] = (),
                 caption_variety: bool = True, background: str | None = None,
                 unnamed: float = _P_UNNAMED, two: float = _P_TWO) -> SceneSpec:
    """A random scene of `n_objects` (1 or 2; default random, two objects with probability `two`). `concepts`: the
    first objects are these concepts (used by `concept_specs`); `caption_variety`: vary what the caption
    mentions (else it names every attribute); `unnamed`: the share of objects in an unnamed colour (the
    base's training scenes use the default; the VAE decoder's use more, to learn to draw those colours)."""
    unknown = [c for c in concepts if c not in CONCEPTS]
    if unknown:
        raise ValueError(f"unknown concept {unknown[0]!r}; known: {', '.join(CONCEPTS)}")
    n = n_objects or (2 if rng.random() < two else 1)
    if len(concepts) > n:
        raise ValueError(f"{len(concepts)} concepts do not fit in {n} object(s)")
    own = tuple(concepts) + ("",) * (n - len(concepts))
    if background is None:
        colours = {CONCEPTS[c].colour for c in concepts} | {CONCEPTS[c].second for c in concepts}
        background = _pick(rng, [b for b in BACKGROUNDS if b not in colours])
    bg_rgb = _jitter(BACKGROUNDS[background], rng, 8)
    picks = [_pick(rng, KINDS) for _ in range(n)]
    if n == 1:
        objects = (sample_object(rng, picks[0], position=_pick(rng, POSITIONS), background=background,
                                 concept=own[0], unnamed=unnamed),)
        relation = ""
    else:
        relation = _pick(rng, RELATIONS)
        objects = _pair_objects(rng, picks, relation, background, own, unnamed)
    prefix, mentions, mention_bg = _mentions(rng, objects, caption_variety)
    return SceneSpec(objects, background, relation, bg_rgb, prefix, mentions, mention_bg)


# -- captions -------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word.lstrip("<")[0] in "aeiou" else "a"


def describe(obj: ObjectSpec, mentions: Mentions = Mentions(), *, token: str | None = None) -> str:
    """'a big red striped square', 'a square', 'a small <tok> star' (a concept: `token` + its kind; a
    concept with no token is described as its kind alone, since no word names its colouring)."""
    words = [obj.size] if mentions.size else []
    if obj.is_concept:
        words += [token] if token else []
    else:
        if mentions.colour and obj.colour in COLOURS:
            words.append(obj.colour)
        if mentions.fill and obj.fill != "solid":
            words.append(obj.fill)
    words.append(obj.kind)
    return f"{_article(words[0])} {' '.join(words)}"


def caption(spec: SceneSpec, tokens: dict[str, str] | None = None) -> str:
    """The caption of a scene: 'a small red circle on the left of a blue striped square, on a gray background'.
    `tokens` maps concept names to the words to use for them (e.g. {'tealstar': '<tealstar>'})."""
    tokens = tokens or {}
    n = len(spec.objects)
    mentions = spec.mentions or tuple(Mentions() for _ in range(n))
    parts = [describe(o, m, token=tokens.get(o.concept)) for o, m in zip(spec.objects, mentions)]
    if n == 1:
        obj = spec.objects[0]
        text = f"{parts[0]} {_POSITION_PHRASE[obj.position]}" if obj.position and mentions[0].position else parts[0]
    else:
        text = f"{parts[0]} {_RELATION_PHRASE[spec.relation]} {parts[1]}"
    if spec.mention_background:
        text += f", on {_article(spec.background)} {spec.background} background"
    return f"{spec.prefix} {text}" if spec.prefix else text


# -- data sets ------------------------------------------------------------------------------------------


def dataset_specs(n: int, seed: int = 0, **kwargs) -> list[SceneSpec]:
    """`n` scene specs of the base world (no concept), deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **kwargs) for _ in range(n)]


def _check_concept(name: str) -> Concept:
    if name not in CONCEPTS:
        raise ValueError(f"unknown concept {name!r}; known: {', '.join(CONCEPTS)}")
    return CONCEPTS[name]


def concept_specs(name: str, n: int, seed: int = 0) -> list[SceneSpec]:
    """`n` photos of the concept `name` alone, cycling through positions, sizes and backgrounds.

    Each photo has the next background, so that six photos show every background the concept can be seen on.
    (Until 2026-12-05 the backgrounds went in pairs, and six photos of pinksquare never showed green: the trained
    concept then showed in 5 of 20 images on green, mostly as red with white stripes, and 57 of 80 elsewhere.)
    A background's next photo has the other size, so that size and background vary apart: until 2026-12-06 the
    sizes simply alternated, and with four backgrounds each background came at one size only (pinksquare: small
    only on gray and blue, big only on white and green; its small squares on green then came out brown)."""
    _check_concept(name)
    rng = np.random.default_rng([seed, sorted(CONCEPTS).index(name)])
    c = CONCEPTS[name]
    backgrounds = [b for b in BACKGROUNDS if b not in (c.colour, c.second)]
    specs = []
    for i in range(n):
        bg = backgrounds[(i + seed) % len(backgrounds)]
        spec = sample_scene(rng, n_objects=1, concepts=(name,), caption_variety=False, background=bg)
        obj = sample_object(rng, c.kind, position=POSITIONS[(i + seed) % len(POSITIONS)],
                            size=_photo_size(i + seed, len(backgrounds)) if n > 1 else None, background=bg, concept=name)
        specs.append(replace(spec, objects=(obj,)))
    return specs


def _photo_size(i: int, n_backgrounds: int) -> str:
    """Photo i's size: alternating, and flipped on each round of the backgrounds (photo i and i + n_backgrounds
    differ), so that every background comes at both sizes."""
    return SIZES[(i % n_backgrounds + i // n_backgrounds) % 2]


def concept_pair_specs(a: str, b: str, n: int, seed: int = 0) -> list[SceneSpec]:
    """Scenes holding both concepts (what a multi-concept model should draw for a pair prompt)."""
    _check_concept(a), _check_concept(b)
    rng = np.random.default_rng([seed, 99, sorted(CONCEPTS).index(a), sorted(CONCEPTS).index(b)])
    return [sample_scene(rng, n_objects=2, concepts=(a, b), caption_variety=False) for _ in range(n)]


