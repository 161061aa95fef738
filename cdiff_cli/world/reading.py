"""Reading a nano-world picture back into what is in it, by classical analysis (numpy and PIL only).

The world (`cdiff_cli.world`) is procedural, so its images can be read without a learned scorer:

- the background is the palette colour nearest to the median of the image's border;
- objects are the connected regions that differ from it (holes filled, specks dropped);
- an object's kind is the shape template with the best overlap once both are scaled to its bounding box;
- its colour is the palette colour whose segment to its pattern colour (black or white) fits its inner
  pixels best (each is one, the other, or a blend of the two where the picture is soft), and its fill is
  solid unless its pixels spread along that segment: in bands along rows (striped) or in spots (dotted);
- its size and position follow from the template's fitted radius and its centre.

    reading = read(image)      # Reading(background='gray', objects=(Seen(kind='star', ...),))

The images are 64 px, so a plain flood fill labels regions in a millisecond. `cdiff_cli.world.oracle` scores
readings against prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

from cdiff_cli.world import scenes as W
from cdiff_cli.world.pictures import shape_mask

SIDE = 64  # images are read at the world's size
_BG_DISTANCE = 45.0  # RGB distance from the background above which a pixel belongs to an object
_MIN_AREA = 24  # pixels: smaller regions are specks
_PATTERN_SHARE = 0.12  # share of an object's inner pixels in the pattern colour for it to count as a pattern
_PATTERN_SPREAD = 0.12  # or the spread (std) of where its pixels lie between its colour and the pattern's
_MAIN_SHARE = 0.25  # share of an object's inner pixels near its colour (under _MAIN_T towards its pattern's), at least
_MAIN_T = 0.3  # (0: the colour itself, 1: its pattern colour)
_STRIPE_ROWS = 0.6  # stripes: the row means of the pattern spread at least this share of all pixels' spread
_TEMPLATE = 32  # side of the normalised shape templates


# -- what the oracle reads ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Look:
    """What an object looks like apart from where it is and how big: a concept's identity."""

    kind: str
    colour: str
    fill: str

    @classmethod
    def of(cls, concept: W.Concept) -> Look:
        return cls(concept.kind, concept.colour, concept.fill)

    def words(self) -> str:
        """'a teal star', 'a pink striped square' (palette names, also the unnamed ones)."""
        fill = "" if self.fill == "solid" else f" {self.fill}"
        text = f"{self.colour}{fill} {self.kind}"
        return f"{'an' if text[0] in 'aeiou' else 'a'} {text}"


@dataclass(frozen=True)
class Seen:
    """One object read from an image; x, y, r are fractions of the image side."""

    kind: str
    colour: str  # a world.PALETTE name
    fill: str  # "solid", "striped" or "dotted"
    size: str
    position: str  # the nearest of world.POSITIONS
    x: float
    y: float
    r: float
    area: int  # pixels
    shape_score: float  # IoU with the best template (1 = a perfect shape)

    @property
    def look(self) -> Look:
        return Look(self.kind, self.colour, self.fill)


@dataclass(frozen=True)
class Reading:
    background: str
    objects: tuple[Seen, ...]  # largest first

    def relation(self, first: int = 0, second: int = 1) -> str:
        """Where objects[first] is relative to objects[second]: one of world.RELATIONS."""
        a, b = self.objects[first], self.objects[second]
        dx, dy = a.x - b.x, a.y - b.y
        if abs(dx) >= abs(dy):
            return "left of" if dx < 0 else "right of"
        return "above" if dy < 0 else "below"


# -- reading --------------------------------------------------------------------------------------------


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> np.ndarray:
    """Index into `table` of the colour nearest to each row of rgb [n, 3]."""
    ref = np.array(list(table.values()), float)
    return np.argmin(((rgb[:, None, :] - ref[None]) ** 2).sum(-1), axis=1)


@cache
def _reference(kind: str) -> np.ndarray:
    """The kind's outline at radius 200 around (256, 256) on a 512 px canvas (bool): what templates, extents
    and centre offsets are measured on."""
    return np.asarray(shape_mask(kind, 256, 256, 200, 512)) > 127


@cache
def _templates() -> dict[str, np.ndarray]:
    """Each kind's outline, cropped to its bounding box and resized to _TEMPLATE x _TEMPLATE (bool)."""
    out = {}
    for kind in W.KINDS:
        out[kind] = _normalise(_reference(kind))
    return out


@cache
def _extent() -> dict[str, tuple[float, float]]:
    """Each kind's bounding-box width and height in units of its radius."""
    out = {}
    for kind in W.KINDS:
        ys, xs = np.nonzero(_reference(kind))
        out[kind] = ((xs.max() - xs.min() + 1) / 200, (ys.max() - ys.min() + 1) / 200)
    return out


def _normalise(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    im = Image.fromarray(crop.astype(np.uint8) * 255).resize((_TEMPLATE, _TEMPLATE), Image.BILINEAR)
    return np.asarray(im) > 127


def _kind(mask: np.ndarray) -> tuple[str, float]:
    norm = _normalise(mask)
    scores = {k: (norm & t).sum() / max(1, (norm | t).sum()) for k, t in _templates().items()}
    best = max(scores, key=scores.get)
    return best, float(scores[best])


def _colour_and_fill(pixels: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> tuple[str, str]:
    """The object's colour and fill (pixels: [n, 3] of its inside).

    Every pixel of a world object is its colour, its pattern's colour, or (where the picture is soft, as
    generated pictures are) a blend of the two: a point on the segment between them. So the colour is the
    palette colour whose segment to its pattern colour lies nearest the pixels, among colours that cover a
    fair share of them; a nearest-colour vote instead reads blurred pink and black stripes as brown."""
    names, best = list(W.PALETTE), None
    for name in names:
        t, dist = _along(pixels, name)
        share = float((t < _MAIN_T).mean())
        if share < _MAIN_SHARE:
            continue  # the colour itself is hardly there: its pattern colour alone is another object's
        cost = float(dist.mean())
        if best is None or cost < best[0]:
            best = (cost, name, t)
    if best is None:  # every candidate covers too little: fall back on the commonest nearest colour
        idx = _nearest(pixels, W.PALETTE)
        main = names[int(np.bincount(idx, minlength=len(names)).argmax())]
        best = (0.0, main, _along(pixels, main)[0])
    _, main, t = best
    if main in W.SOLID_ONLY or not _patterned(t):
        return main, "solid"
    return main, _pattern_kind(t, ys, xs)


def _along(pixels: np.ndarray, colour: str) -> tuple[np.ndarray, np.ndarray]:
    """Where each pixel lies between `colour` (0) and its pattern colour (1), and its distance from that
    segment. Colours that are never patterned have no segment: every pixel is at 0."""
    m = np.array(W.PALETTE[colour], float)
    if colour in W.SOLID_ONLY:
        return np.zeros(len(pixels)), np.sqrt(((pixels - m) ** 2).sum(-1))
    q = np.array(W.PALETTE[W.pattern_colour(colour)], float)
    t = np.clip((pixels - m) @ (q - m) / float((q - m) @ (q - m)), 0.0, 1.0)
    return t, np.sqrt(((pixels - (m + t[:, None] * (q - m))) ** 2).sum(-1))


def _patterned(t: np.ndarray) -> bool:
    """A pattern: enough pixels nearer the pattern colour, or (blurred) a wide spread between the two."""
    return float((t > 0.5).mean()) >= _PATTERN_SHARE or float(t.std()) >= _PATTERN_SPREAD


def _pattern_kind(t: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> str:
    """Striped (the pattern's share changes from row to row, not from column to column) or dotted."""
    def spread(coord):
        shares = [t[coord == v].mean() for v in np.unique(coord) if (coord == v).sum() >= 3]
        return float(np.std(shares)) if len(shares) > 2 else 0.0

    rows, cols = spread(ys), spread(xs)
    return "striped" if rows > _STRIPE_ROWS * float(t.std()) and rows > 1.6 * cols else "dotted"


def _size(r: float, n_objects: int) -> str:
    small, big = (W.RADIUS_PAIR if n_objects > 1 else W.RADIUS).values()
    return "small" if r < (small[1] + big[0]) / 2 else "big"


def position_of(x: float, y: float) -> str:
    return min(W.CENTRES, key=lambda p: (W.CENTRES[p][0] - x) ** 2 + (W.CENTRES[p][1] - y) ** 2)


# -- binary morphology on small masks (3x3 neighbourhoods) ---------------------------------------------


def _shifts(m: np.ndarray, fill: bool) -> list[np.ndarray]:
    p = np.pad(m, 1, constant_values=fill)
    h, w = m.shape
    return [p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]


def _erode(m: np.ndarray) -> np.ndarray:
    return np.logical_and.reduce(_shifts(m, True))


def _dilate(m: np.ndarray) -> np.ndarray:
    return np.logical_or.reduce(_shifts(m, False))


def _label(m: np.ndarray) -> list[np.ndarray]:
    """The 4-connected regions of a boolean mask, each as its own mask."""
    seen = np.zeros_like(m, bool)
    h, w = m.shape
    regions = []
    for y0, x0 in zip(*np.nonzero(m)):
        if seen[y0, x0]:
            continue
        stack, pts = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pts.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and m[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        region = np.zeros_like(m, bool)
        region[tuple(np.array(pts).T)] = True
        regions.append(region)
    return regions


def _fill_holes(m: np.ndarray) -> np.ndarray:
    """The mask with every background pocket that does not reach the border filled."""
    outside = np.pad(~m, 1, constant_values=True)
    reached = [r for r in _label(outside) if r[0, 0]]
    return m | ~reached[0][1:-1, 1:-1]


def _as_array(image) -> np.ndarray:
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    im = im.convert("RGB")
    if im.size != (SIDE, SIDE):
        im = im.resize((SIDE, SIDE), Image.BILINEAR)
    return np.asarray(im, dtype=float)


def read(image) -> Reading:
    """What is in a world image (PIL image or HxWx3 uint8 array; resized to 64 px): background and objects."""
    a = _as_array(image)
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3),
                             a[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = list(W.BACKGROUNDS)[int(_nearest(bg_rgb[None], W.BACKGROUNDS)[0])]
    raw = np.sqrt(((a - bg_rgb) ** 2).sum(-1)) > _BG_DISTANCE
    fg = _dilate(_erode(raw))  # opening: drop specks and one-pixel bridges
    fg = _fill_holes(_erode(_dilate(fg)))  # closing, then the holes a pattern left
    regions = sorted((m for m in _label(fg) if m.sum() >= _MIN_AREA and not _fills_frame(m)), key=lambda m: -m.sum())
    # Each region's own pixels, before the smoothing that finds regions rounds off small points and arms.
    shapes = [_fill_holes(raw & _dilate(m)) for m in regions]
    objects = tuple(_read_object(a, m, len(regions)) for m in shapes)
    return Reading(background, objects)


def _fills_frame(mask: np.ndarray) -> bool:
    """A region as wide and tall as the image is no object of the world (noise, a photo that is not a scene)."""
    ys, xs = np.nonzero(mask)
    return xs.max() - xs.min() > 0.9 * SIDE and ys.max() - ys.min() > 0.9 * SIDE


def _read_object(a: np.ndarray, mask: np.ndarray, n_objects: int) -> Seen:
    ys, xs = np.nonzero(mask)
    kind, score = _kind(mask)
    w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    ew, eh = _extent()[kind]
    r = (w / ew + h / eh) / 2 / SIDE
    # The colour from the inner pixels: the edge blends with the background.
    inner = _erode(mask)
    if inner.sum() < 8:
        inner = mask
    elif _erode(inner).sum() >= 12:  # soft pictures blend two pixels of edge: off a solid object, a false pattern
        inner = _erode(inner)
    iy, ix = np.nonzero(inner)
    colour, fill = _colour_and_fill(a[iy, ix], iy, ix)
    # The centre of a shape's template box: the world places shapes by their centre, not their centroid.
    cx = (xs.min() + xs.max() + 1) / 2 / SIDE
    cy = (ys.min() + ys.max() + 1) / 2 / SIDE
    if kind in ("triangle", "star", "heart"):  # their boxes sit off their centres by a known amount
        cy += _centre_offset(kind) * r
    return Seen(kind, colour, fill, _size(r, n_objects), position_of(cx, cy), float(cx), float(cy), float(r),
                int(mask.sum()), score)


@cache
def _centre_offset(kind: str) -> float:
    """How far (in radii) the shape's centre lies below its bounding box's centre."""
    ys, _ = np.nonzero(_reference(kind))
    return (256 - (ys.min() + ys.max() + 1) / 2) / 200
