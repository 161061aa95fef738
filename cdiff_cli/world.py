"""A procedural, captioned image world: coloured shapes on textured backgrounds, deterministic from a seed.

It is small enough to train a real text-to-image model on a CPU (see `scripts/train_nano.py` and the
packaged `--base nano`), and it has NOVEL concepts the base never sees, to show Custom Diffusion at work
offline: a pink heart, a yellow-and-black zigzag square, a blue-and-orange two-tone circle, a rainbow
star and a cyan crescent moon. Their class words ("shape", "square", "circle", "star") are known words.

    rng = numpy.random.default_rng(0)
    spec = sample_scene(rng)
    image, text = render(spec), caption(spec)   # 64x64 RGB, "a small red square on the left, ..."
    pairs = dataset(1000, seed=0)               # [(image, caption)], base kinds only
    imgs = concept_images("heart", 6, seed=0)   # the novel concept in varied scenes

Everything random lives in the `SceneSpec` (exact positions, colour jitter, texture phase), so
`render` and `caption` are pure functions of it. Pure PIL and numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw

# -- the vocabulary of the world ---------------------------------------------------------------------

KINDS = ("square", "circle", "triangle", "diamond", "cross", "ring", "star")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (245, 220, 40),
    "orange": (245, 135, 25),
    "purple": (140, 55, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS = {
    "gray": (128, 128, 128),
    "white": (235, 235, 235),
    "black": (30, 30, 30),
    "blue": (70, 100, 190),
    "green": (70, 150, 80),
    "yellow": (225, 205, 90),
    "purple": (125, 80, 160),
}
# Object colours that would hardly show on a background (besides the same colour name).
_CLASHES = {
    "white": {"white", "yellow"},
    "black": {"black"},
    "yellow": {"yellow", "orange", "white"},
    "green": {"green"},
    "blue": {"blue", "purple"},
    "purple": {"purple", "blue"},
    "gray": set(),
}
SIZES = ("small", "big")
POSITIONS = ("left", "right", "top", "bottom", "middle")
TEXTURES = ("plain", "striped", "dotted", "checkered")
RELATIONS = ("left of", "right of", "above", "below")
PREFIXES = ("", "a photo of", "a picture of", "an image of")
GENERIC = "shape"  # the word a caption may use instead of the kind ("a small red shape ...")

_POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "middle": "in the middle"}
_RELATION_PHRASE = {"left of": "on the left of", "right of": "on the right of", "above": "above", "below": "below"}
_CENTRES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "middle": (0.5, 0.5)}
# Radius (fraction of the image side) of each size, as (low, high).
_RADIUS = {"small": (0.10, 0.13), "big": (0.18, 0.22)}
_RADIUS_PAIR = {"small": (0.09, 0.11), "big": (0.15, 0.17)}


@dataclass(frozen=True)
class Concept:
    """A novel object the base never sees: a shape and a fixed colouring, described by a known class word."""

    name: str
    class_word: str
    shape: str  # the outline: a base kind or a novel one ("heart", "moon")
    fill: str  # "solid", "zigzag", "twotone" or "rainbow"
    colours: tuple[tuple[int, int, int], ...]
    description: str


CONCEPTS: dict[str, Concept] = {
    c.name: c
    for c in (
        Concept("heart", GENERIC, "heart", "solid", ((240, 90, 170),), "a pink heart"),
        Concept("zigzag", "square", "square", "zigzag", ((245, 215, 30), (20, 20, 20)), "a square with yellow and black zigzag stripes"),
        Concept("twotone", "circle", "circle", "twotone", ((40, 80, 225), (245, 135, 25)), "a circle, half blue and half orange"),
        Concept("rainbow", "star", "star", "rainbow",
                ((230, 40, 40), (245, 150, 20), (240, 225, 40), (40, 170, 60), (60, 90, 230)), "a star with five differently coloured arms"),
        Concept("moon", GENERIC, "moon", "solid", ((90, 215, 225),), "a cyan crescent moon"),
    )
}
# Pairs of concepts for multi-concept composition (different class words where possible).
CONCEPT_PAIRS: tuple[tuple[str, str], ...] = (("heart", "zigzag"), ("twotone", "rainbow"), ("zigzag", "twotone"),
                                              ("rainbow", "moon"), ("heart", "twotone"))

# Extra words that prompts around the world use (Custom Diffusion's augmentation prefixes, prompt templates).
_PROMPT_WORDS = ("far", "away", "very", "zoomed", "close", "up", "and", "with", "next", "to", "style")


@lru_cache(maxsize=None)
def _words() -> tuple[str, ...]:
    words: list[str] = []
    for chunk in ([*PREFIXES, "a an"], SIZES, COLOURS, BACKGROUNDS, KINDS, [GENERIC], _POSITION_PHRASE.values(),
                  _RELATION_PHRASE.values(), TEXTURES, ["background"], [c.class_word for c in CONCEPTS.values()],
                  _PROMPT_WORDS):
        for phrase in chunk:
            for w in phrase.split():
                if w not in words:
                    words.append(w)
    return tuple(words)


WORDS: tuple[str, ...] = _words()


# -- scene specs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """One object: `kind` is a base kind or a concept name; x, y, r are fractions of the image side."""

    kind: str
    colour: str  # a COLOURS name; "" for a concept (it has its own colouring)
    size: str
    x: float
    y: float
    r: float
    rgb: tuple[int, int, int] = (0, 0, 0)  # the jittered colour actually drawn
    position: str = ""  # where it is, for a single object: one of POSITIONS

    @property
    def is_concept(self) -> bool:
        return self.kind in CONCEPTS


@dataclass(frozen=True)
class SceneSpec:
    """A whole scene and how its caption is phrased."""

    objects: tuple[ObjectSpec, ...]
    background: str
    texture: str
    relation: str = ""  # for two objects: one of RELATIONS, objects[0] relative to objects[1]
    bg_rgb: tuple[int, int, int] = (128, 128, 128)
    phase: tuple[int, int] = (0, 0)  # texture offset in pixels
    prefix: str = ""
    generic: tuple[bool, ...] = field(default=())  # per object: say "shape" instead of the kind
    mention_size: tuple[bool, ...] = field(default=())
    mention_background: bool = True

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(o.kind for o in self.objects)


def _jitter(rgb, rng: np.random.Generator, amount: int = 12) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def sample_object(rng: np.random.Generator, kind: str, *, position: str, size: str | None = None,
                  colour: str | None = None, background: str = "gray", pair: bool = False,
                  centre: tuple[float, float] | None = None) -> ObjectSpec:
    """An object of `kind` at a named position (random size and colour unless given)."""
    size = size or SIZES[rng.integers(len(SIZES))]
    lo, hi = (_RADIUS_PAIR if pair else _RADIUS)[size]
    r = float(rng.uniform(lo, hi))
    if centre is None:
        cx, cy = _CENTRES[position]
        # Move along the free axis, a little along the other; keep the object inside the image.
        free = 0.10 if position != "middle" else 0.04
        cx += rng.uniform(-free, free) if position in ("top", "bottom", "middle") else rng.uniform(-0.04, 0.04)
        cy += rng.uniform(-free, free) if position in ("left", "right", "middle") else rng.uniform(-0.04, 0.04)
    else:
        cx, cy = centre
    cx, cy = float(np.clip(cx, r + 0.02, 0.98 - r)), float(np.clip(cy, r + 0.02, 0.98 - r))
    if kind in CONCEPTS:
        colour, rgb = "", CONCEPTS[kind].colours[0]
    else:
        if colour is None:
            choices = [c for c in COLOURS if c not in _CLASHES.get(background, {background})]
            colour = choices[rng.integers(len(choices))]
        rgb = _jitter(COLOURS[colour], rng)
    return ObjectSpec(kind, colour, size, cx, cy, r, rgb, position)


def sample_scene(rng: np.random.Generator, *, allow: Iterable[str] | None = None, n_objects: int | None = None,
                 concept: str | None = None, caption_variety: bool = True) -> SceneSpec:
    """A random scene. `allow`: the kinds objects may take (default: the base KINDS, never a concept);
    `concept`: one object is that concept (used by `concept_images`); `n_objects`: 1 or 2 (default random,
    one object 60 % of the time); `caption_variety`: vary how the caption is phrased (else the full caption)."""
    kinds = tuple(allow) if allow is not None else KINDS
    unknown = [k for k in kinds if k not in KINDS and k not in CONCEPTS]
    if unknown or not kinds:
        raise ValueError(f"unknown kinds {unknown}" if unknown else "allow is empty")
    if concept is not None and concept not in CONCEPTS:
        raise ValueError(f"unknown concept {concept!r}; known: {', '.join(CONCEPTS)}")
    n = n_objects or (1 if rng.random() < 0.6 else 2)
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    bg_rgb = _jitter(BACKGROUNDS[background], rng, 10)
    picks = [kinds[rng.integers(len(kinds))] for _ in range(n)]
    if concept is not None:
        picks[int(rng.integers(n))] = concept
    if n == 1:
        position = POSITIONS[rng.integers(len(POSITIONS))]
        objects = (sample_object(rng, picks[0], position=position, background=background),)
        relation = ""
    else:
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        first, second = {"left of": ("left", "right"), "right of": ("right", "left"),
                         "above": ("top", "bottom"), "below": ("bottom", "top")}[relation]
        spread = 0.1
        along = rng.uniform(0.5 - spread, 0.5 + spread, size=2)
        objs = []
        for kind, where, a in zip(picks, (first, second), along):
            cx, cy = _CENTRES[where]
            cx, cy = (cx + rng.uniform(-0.03, 0.03), a) if where in ("left", "right") else (a, cy + rng.uniform(-0.03, 0.03))
            objs.append(sample_object(rng, kind, position=where, background=background, pair=True, centre=(cx, cy)))
        objects = tuple(objs)
    if caption_variety:
        prefix = PREFIXES[rng.integers(len(PREFIXES))] if rng.random() < 0.3 else ""
        generic = tuple(bool(rng.random() < 0.1) for _ in objects)
        mention_size = tuple(bool(rng.random() < 0.85) for _ in objects)
        mention_background = bool(rng.random() < 0.85)
    else:
        prefix, generic, mention_size, mention_background = "", (False,) * n, (True,) * n, True
    phase = (int(rng.integers(8)), int(rng.integers(8)))
    return SceneSpec(objects, background, texture, relation, bg_rgb, phase, prefix, generic, mention_size,
                     mention_background)


# -- captions -------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(obj: ObjectSpec, *, generic: bool = False, size: bool = True, token: str | None = None) -> str:
    """'a small red square', 'a big red shape', 'a heart shape' (a concept: its name, or `token`, + class word)."""
    if obj.is_concept:
        c = CONCEPTS[obj.kind]
        words = [obj.size] if size else []
        words += [token or c.name, c.class_word]
    else:
        words = ([obj.size] if size else []) + [obj.colour, GENERIC if generic else obj.kind]
    return f"{_article(words[0].lstrip('<'))} {' '.join(words)}"


def caption(spec: SceneSpec, tokens: dict[str, str] | None = None) -> str:
    """The caption of a scene: 'a small red square on the left of a blue circle, on a striped gray background'.
    `tokens` maps concept names to the words to use for them (e.g. {'heart': '<new1>'})."""
    tokens = tokens or {}
    n = len(spec.objects)
    generic = spec.generic or (False,) * n
    sizes = spec.mention_size or (True,) * n
    parts = [describe(o, generic=g, size=s, token=tokens.get(o.kind)) for o, g, s in zip(spec.objects, generic, sizes)]
    if n == 1:
        text = f"{parts[0]} {_POSITION_PHRASE[spec.objects[0].position]}" if spec.objects[0].position else parts[0]
    else:
        text = f"{parts[0]} {_RELATION_PHRASE[spec.relation]} {parts[1]}"
    if spec.mention_background:
        bg = spec.background if spec.texture == "plain" else f"{spec.texture} {spec.background}"
        text += f", on {_article(bg)} {bg} background"
    if spec.prefix:
        text = f"{spec.prefix} {text}"
    return text


# -- rendering ------------------------------------------------------------------------------------------

_SS = 4  # supersampling factor: draw at 4x, then downsample (anti-aliased edges)


def _shade(rgb, towards: int, amount: float) -> tuple[int, int, int]:
    return tuple(int(round(c + (towards - c) * amount)) for c in rgb)


def _background(spec: SceneSpec, size: int) -> Image.Image:
    s = size * _SS
    base = spec.bg_rgb
    lum = sum(base) / 3
    other = _shade(base, 255 if lum < 140 else 0, 0.35)
    im = Image.new("RGB", (s, s), base)
    if spec.texture == "plain":
        return im
    d = ImageDraw.Draw(im)
    period = max(4, size // 8) * _SS
    ox, oy = spec.phase[0] * _SS * size // 64, spec.phase[1] * _SS * size // 64
    if spec.texture == "striped":  # diagonal stripes
        w = period // 2
        for k in range(-2 * s, 2 * s, period):
            k += ox
            d.polygon([(k, 0), (k + w, 0), (k + w + s, s), (k + s, s)], fill=other)
    elif spec.texture == "dotted":
        rad = period // 5
        for y in range(-period, s + period, period):
            for x in range(-period, s + period, period):
                cx, cy = x + ox + period // 2, y + oy + period // 2
                d.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=other)
    elif spec.texture == "checkered":
        for j, y in enumerate(range(-period, s + period, period)):
            for i, x in enumerate(range(-period, s + period, period)):
                if (i + j) % 2:
                    d.rectangle((x + ox, y + oy, x + ox + period - 1, y + oy + period - 1), fill=other)
    return im


def _star_points(cx, cy, r, inner=0.45, n=5, rot=-math.pi / 2):
    pts = []
    for i in range(2 * n):
        rad = r if i % 2 == 0 else r * inner
        a = rot + i * math.pi / n
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _mask(shape: str, cx: float, cy: float, r: float, s: int) -> Image.Image:
    """The object's outline as an 'L' mask of side s (pixels at supersampled resolution)."""
    m = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(m)
    if shape == "square":
        h = 0.85 * r
        d.rectangle((cx - h, cy - h, cx + h, cy + h), fill=255)
    elif shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)], fill=255)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + 0.72 * r, cy), (cx, cy + r), (cx - 0.72 * r, cy)], fill=255)
    elif shape == "cross":
        t = 0.33 * r
        d.rectangle((cx - t, cy - r, cx + t, cy + r), fill=255)
        d.rectangle((cx - r, cy - t, cx + r, cy + t), fill=255)
    elif shape == "ring":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        q = 0.55 * r
        d.ellipse((cx - q, cy - q, cx + q, cy + q), fill=0)
    elif shape == "star":
        d.polygon(_star_points(cx, cy, 1.1 * r), fill=255)
    elif shape == "heart":
        pts = []
        for i in range(64):
            t = 2 * math.pi * i / 64
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 16.5, cy - r * (y + 2.5) / 16.5))
        d.polygon(pts, fill=255)
    elif shape == "moon":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        off, q = 0.45 * r, 0.85 * r
        d.ellipse((cx + off - q, cy - 0.25 * r - q, cx + off + q, cy - 0.25 * r + q), fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m


def _fill(obj: ObjectSpec, s: int) -> Image.Image:
    """What shows through the object's mask."""
    if not obj.is_concept:
        return Image.new("RGB", (s, s), obj.rgb)
    c = CONCEPTS[obj.kind]
    cx, cy, r = obj.x * s, obj.y * s, obj.r * s
    im = Image.new("RGB", (s, s), c.colours[0])
    d = ImageDraw.Draw(im)
    if c.fill == "zigzag":  # horizontal zigzag bands, 4 across the object
        band = max(2.0, 2 * r / 4)
        amp = band * 0.5
        k = 0
        y0 = cy - 1.2 * r
        while y0 < cy + 1.2 * r:
            if k % 2:
                top, bot = [], []
                steps = 8
                for i in range(steps + 1):
                    x = cx - 1.2 * r + i * 2.4 * r / steps
                    dy = amp if i % 2 else -amp
                    top.append((x, y0 + dy))
                    bot.append((x, y0 + band + dy))
                d.polygon(top + bot[::-1], fill=c.colours[1])
            y0 += band
            k += 1
    elif c.fill == "twotone":  # left half one colour, right half the other
        d.rectangle((cx, 0, s, s), fill=c.colours[1])
    elif c.fill == "rainbow":  # each arm of the star its own colour
        for i, col in enumerate(c.colours):
            a0 = -90 + i * 72 - 36
            d.pieslice((cx - 2 * r, cy - 2 * r, cx + 2 * r, cy + 2 * r), a0, a0 + 72, fill=col)
    return im


def _object_masks(spec: SceneSpec, s: int):
    """(object, its outline mask) at supersampled side `s`, in drawing order."""
    for obj in spec.objects:
        shape = CONCEPTS[obj.kind].shape if obj.is_concept else obj.kind
        yield obj, _mask(shape, obj.x * s, obj.y * s, obj.r * s, s)


def render(spec: SceneSpec, size: int = 64) -> Image.Image:
    """Draw a scene as a `size` x `size` RGB image."""
    s = size * _SS
    im = _background(spec, size)
    for obj, mask in _object_masks(spec, s):
        im.paste(_fill(obj, s), (0, 0), mask)
    return im.resize((size, size), Image.LANCZOS)


def object_mask(spec: SceneSpec, size: int = 64) -> Image.Image:
    """Where the scene's objects are: an 'L' image, 255 on objects, 0 on the background (anti-aliased).
    scripts/train_nano.py weights the VAE's reconstruction loss with it."""
    s = size * _SS
    m = Image.new("L", (s, s), 0)
    for _, mask in _object_masks(spec, s):
        m.paste(255, (0, 0), mask)
    return m.resize((size, size), Image.LANCZOS)


# -- data sets ------------------------------------------------------------------------------------------


def dataset_specs(n: int, seed: int = 0, **kwargs) -> list[SceneSpec]:
    """`n` scene specs of the base world (no novel concept), deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **kwargs) for _ in range(n)]


def dataset(n: int, seed: int = 0, size: int = 64, **kwargs) -> list[tuple[Image.Image, str]]:
    """`n` (image, caption) pairs of the base world: never a novel concept."""
    return [(render(s, size), caption(s)) for s in dataset_specs(n, seed, **kwargs)]


def concept_specs(name: str, n: int, seed: int = 0) -> list[SceneSpec]:
    """`n` scenes of the concept `name` alone, in varied positions, sizes and backgrounds (each different)."""
    if name not in CONCEPTS:
        raise ValueError(f"unknown concept {name!r}; known: {', '.join(CONCEPTS)}")
    rng = np.random.default_rng([seed, sorted(CONCEPTS).index(name)])
    specs: list[SceneSpec] = []
    for i in range(n):
        spec = sample_scene(rng, allow=KINDS, n_objects=1, concept=name, caption_variety=False)
        # Cycle through positions and sizes so that even 4 images cover the variety.
        obj = spec.objects[0]
        position = POSITIONS[(i + seed) % len(POSITIONS)]
        size = SIZES[(i // 2 + seed) % 2] if n > 1 else obj.size
        obj = sample_object(rng, name, position=position, size=size, background=spec.background)
        specs.append(replace(spec, objects=(obj,)))
    return specs


def concept_images(name: str, n: int = 6, seed: int = 0, size: int = 64) -> list[Image.Image]:
    """`n` (4-8 is typical) images of the novel concept `name` for Custom Diffusion training."""
    return [render(s, size) for s in concept_specs(name, n, seed)]


def concept_pair_specs(a: str, b: str, n: int, seed: int = 0) -> list[SceneSpec]:
    """Scenes holding both concepts (for checking a multi-concept model's compositions)."""
    rng = np.random.default_rng([seed, 99, sorted(CONCEPTS).index(a), sorted(CONCEPTS).index(b)])
    out = []
    for _ in range(n):
        spec = sample_scene(rng, n_objects=2, caption_variety=False)
        o1, o2 = spec.objects
        objs = (sample_object(rng, a, position=o1.position, size=o1.size, pair=True, centre=(o1.x, o1.y)),
                sample_object(rng, b, position=o2.position, size=o2.size, pair=True, centre=(o2.x, o2.y)))
        out.append(replace(spec, objects=objs))
    return out


def save_concept_images(name: str, folder, n: int = 6, seed: int = 0) -> list:
    """Write `concept_images(name, n, seed)` as PNG files into `folder`; returns their paths."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(concept_images(name, n, seed)):
        p = folder / f"{name}_{i}.png"
        im.save(p)
        paths.append(p)
    return paths


def grid(images: list[Image.Image], cols: int = 8, pad: int = 2) -> Image.Image:
    """Tile images into one picture (for looking at samples)."""
    if not images:
        raise ValueError("no images")
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        out.paste(im.convert("RGB").resize((w, h)), (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return out
