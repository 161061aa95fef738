"""Drawing nano-world scenes: shapes, fills and whole pictures from a `SceneSpec` (pure functions of it), the
base world's (image, caption) pairs, a concept's training photos, and a grid for looking at samples.
Pure PIL and numpy."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from cdiff_cli.world.scenes import (
    PALETTE,
    ObjectSpec,
    SceneSpec,
    caption,
    concept_specs,
    dataset_specs,
)

_SS = 4  # supersampling factor: draw at 4x, then downsample (anti-aliased edges)


def _star_points(cx, cy, r, inner=0.45, n=5, rot=-math.pi / 2):
    pts = []
    for i in range(2 * n):
        rad = r if i % 2 == 0 else r * inner
        a = rot + i * math.pi / n
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _heart_points(cx, cy, r, n=64):
    pts = []
    for i in range(n):
        t = 2 * math.pi * i / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((cx + r * x / 16.5, cy - r * (y + 2.5) / 16.5))
    return pts


def shape_mask(kind: str, cx: float, cy: float, r: float, s: int) -> Image.Image:
    """The outline of `kind` centred at (cx, cy) with radius r, as an 'L' mask of side s (pixels)."""
    m = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(m)
    if kind == "square":
        h = 0.82 * r
        d.rectangle((cx - h, cy - h, cx + h, cy + h), fill=255)
    elif kind == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif kind == "triangle":
        d.polygon([(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)], fill=255)
    elif kind == "cross":
        t = 0.36 * r
        d.rectangle((cx - t, cy - r, cx + t, cy + r), fill=255)
        d.rectangle((cx - r, cy - t, cx + r, cy + t), fill=255)
    elif kind == "star":
        d.polygon(_star_points(cx, cy, 1.1 * r), fill=255)
    elif kind == "heart":
        d.polygon(_heart_points(cx, cy, 1.05 * r), fill=255)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return m


def pattern_period(r: float) -> float:
    """The period of an object's stripes or dots, for its radius (in any unit): bold enough for 16x16 latents."""
    return 2 * r / 3


def _fill(obj: ObjectSpec, s: int) -> Image.Image:
    """What shows through the object's mask: its colour, with stripes (horizontal) or a grid of dots."""
    im = Image.new("RGB", (s, s), obj.rgb)
    if obj.fill == "solid":
        return im
    d = ImageDraw.Draw(im)
    second = PALETTE[obj.second]
    cx, cy, r = obj.x * s, obj.y * s, obj.r * s
    p = pattern_period(r)
    off = obj.phase * p
    if obj.fill == "striped":
        y = cy - 1.2 * r - p + off
        while y < cy + 1.2 * r:
            d.rectangle((0, y, s, y + 0.36 * p), fill=second)
            y += p
    else:  # dotted
        rad = 0.26 * p
        y = cy - 1.2 * r - p + off
        while y < cy + 1.2 * r + p:
            x = cx - 1.2 * r - p + off
            while x < cx + 1.2 * r + p:
                d.ellipse((x - rad, y - rad, x + rad, y + rad), fill=second)
                x += p
            y += p
    return im


def _object_masks(spec: SceneSpec, s: int):
    for obj in spec.objects:
        yield obj, shape_mask(obj.kind, obj.x * s, obj.y * s, obj.r * s, s)


def render(spec: SceneSpec, size: int = 64) -> Image.Image:
    """Draw a scene as a `size` x `size` RGB image."""
    s = size * _SS
    im = Image.new("RGB", (s, s), spec.bg_rgb)
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


def dataset(n: int, seed: int = 0, size: int = 64, **kwargs) -> list[tuple[Image.Image, str]]:
    """`n` (image, caption) pairs of the base world: never a concept."""
    return [(render(s, size), caption(s)) for s in dataset_specs(n, seed, **kwargs)]


def concept_images(name: str, n: int = 6, seed: int = 0, size: int = 64) -> list[Image.Image]:
    """`n` (4-8 is typical) photos of the concept `name` for Custom Diffusion training."""
    return [render(s, size) for s in concept_specs(name, n, seed)]


def save_concept_images(name: str, folder, n: int = 6, seed: int = 0, *, masks: bool = False) -> list[Path]:
    """Write `concept_images(name, n, seed)` as PNG files into `folder`; returns their paths. With `masks`, each
    photo's object mask too, as `NAME_i.mask.png` beside it (white on the concept), which training reads."""
    from cdiff_cli.training.images import mask_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, spec in enumerate(concept_specs(name, n, seed)):
        p = folder / f"{name}_{i}.png"
        render(spec).save(p)
        if masks:
            object_mask(spec).point(lambda v: 255 if v >= 128 else 0).save(mask_path(p))
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
