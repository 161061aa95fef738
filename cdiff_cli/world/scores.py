"""Oracle scores for entries on a nano-world base: what the generated pictures show, in counts a person reads.

`cdiff eval` adds these next to the CLIP metrics whenever an entry's base was trained on the world (its
folder holds `cdiff_world.json`, as the shipped `nano` does). The oracle (`cdiff_cli.world.oracle`) reads each
image; a concept's look (kind, colour, fill) is read from its own training images, so any concept drawn in
the world's style is scored, not only the built-in ones.

- presence: share of the concept model's images, on prompts that place the concept in new contexts, in
  which the concept's look appears; the base's images of the same prompts without the token beside it;
- prompt following: per attribute the prompts state (kind, colour, fill, size, position, relation,
  background), and "others": the attributes apart from the concept itself;
- drift: how often the plain class prompt ("photo of a star") yields the concept, before and after, and
  the change in prompt following on ordinary world captions (no token) from the base to the concept model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from cdiff_cli.world import oracle as O
from cdiff_cli.world import scenes as W

WORLD_MARKER = "cdiff_world.json"  # written by scripts/train_nano.py into the model folder

# Prompts that put one concept ({}: "TOKEN CLASS") in new contexts; {bg}: a background it shows on.
SINGLE_TEMPLATES = (
    "a small {} on the left, on a {bg} background",
    "a big {} at the top, on a {bg} background",
    "a {} on the right, on a {bg} background",
    "a small {} at the bottom, on a {bg} background",
    "a big {} in the middle, on a {bg} background",
    "a {} on the left of a red circle, on a {bg} background",
    "a yellow square above a {}, on a {bg} background",
    "a {} below a white triangle, on a {bg} background",
    "a {} on the right of a green cross, on a {bg} background",
    "a big {} on the right, on a {bg} background",
)
# With their articles, as the world's captions have them: "<a> square on the left of <b> circle" is a
# sentence the base never saw, and it draws the second object wrong more often.
PAIR_TEMPLATES = (
    "a {0} on the left of a {1}, on a {bg} background",
    "a {0} above a {1}, on a {bg} background",
    "a {1} on the left of a {0}, on a {bg} background",
    "a {1} below a {0}, on a {bg} background",
    "a small {0} on the right of a big {1}, on a {bg} background",
    "a big {0} below a small {1}, on a {bg} background",
)
OTHERS = ("size", "position", "relation", "background", "plain_object")
ORDINARY_SEED = 20261204  # held-out captions: the training data uses seed 0
REGULARISER_SEED = 1  # the merge's ordinary captions: the training distribution, apart from the held-out ones
REGULARISER_CAPTIONS = 1000


def is_world_base(ref: str | None) -> bool:
    """Is the base at `ref` a model of the nano world (a folder with cdiff_world.json)?"""
    return bool(ref) and (Path(ref) / WORLD_MARKER).is_file()


def world_marker() -> dict:
    """What train_nano.py writes as cdiff_world.json."""
    return {"world": "cdiff nano world", "version": 2, "kinds": list(W.KINDS), "colours": list(W.COLOURS)}


def write_world_marker(folder: str | Path) -> None:
    (Path(folder) / WORLD_MARKER).write_text(json.dumps(world_marker(), indent=2) + "\n", encoding="utf-8")


def backgrounds_for(looks) -> list[str]:
    """Backgrounds on which every look shows (not its colour, nor its pattern's)."""
    bad = set()
    for look in looks:
        if look is not None:
            bad |= {look.colour, W.pattern_colour(look.colour) if look.fill != "solid" else ""}
    return [b for b in ("gray", "black", "blue", "white", "green") if b not in bad] or ["gray"]


def concept_prompts(phrases: list[str], looks: list) -> list[str]:
    """The world prompts for an entry: the single-concept templates for one token, the pair templates
    for each pair of tokens. `phrases`: "TOKEN CLASS" per token."""
    bgs = backgrounds_for(looks)
    if len(phrases) == 1:
        return [t.format(phrases[0], bg=bgs[i % len(bgs)]) for i, t in enumerate(SINGLE_TEMPLATES)]
    out = []
    for i in range(len(phrases)):
        for j in range(i + 1, len(phrases)):
            out += [t.format(phrases[i], phrases[j], bg=bgs[k % len(bgs)]) for k, t in enumerate(PAIR_TEMPLATES)]
    return out


def ordinary_prompts(n: int = 12) -> list[str]:
    """Held-out world captions with no concept (two thirds one object, one third two), every attribute said."""
    singles = W.dataset_specs(n - n // 3, seed=ORDINARY_SEED, n_objects=1, caption_variety=False)
    pairs = W.dataset_specs(n // 3, seed=ORDINARY_SEED + 1, n_objects=2, caption_variety=False)
    return [W.caption(s) for s in singles + pairs]


@lru_cache(maxsize=1)
def regulariser_captions(n: int = REGULARISER_CAPTIONS) -> tuple[str, ...]:
    """World captions of the base's training distribution (one and two objects, varied wording), no concept: on a
    world base, the closed-form merge keeps the k/v outputs on these as near the base as its constraints allow."""
    held_out = set(ordinary_prompts())  # the drift score's captions stay unseen by the merge
    drawn = (W.caption(s) for s in W.dataset_specs(n + len(held_out), seed=REGULARISER_SEED))
    return tuple(c for c in drawn if c not in held_out)[:n]


# -- scores ------------------------------------------------------------------------------------------


@dataclass
class Share:
    """k of n images."""

    k: int
    n: int

    @property
    def value(self) -> float | None:
        return self.k / self.n if self.n else None

    def words(self) -> str:
        return f"{self.k} of {self.n}"


def _share(flags) -> Share:
    flags = list(flags)
    return Share(sum(map(bool, flags)), len(flags))


@dataclass
class ConceptScores:
    token: str
    look: str | None  # in words: "a teal star"; None when its training images show no world object
    presence: Share
    baseline_presence: Share
    colour_presence: Share | None = None  # images with an object of the concept's colour (any kind or fill)
    baseline_colour_presence: Share | None = None
    class_prompt: str = ""
    class_presence: Share | None = None  # drift: the concept model's images of the plain class prompt
    baseline_class_presence: Share | None = None


@dataclass
class WorldScores:
    concepts: list[ConceptScores]
    all_present: Share | None  # several tokens: images that show every concept
    following: dict[str, float]  # the concept model on its prompts, per attribute
    baseline_following: dict[str, float]  # the base on the same prompts without the tokens
    others: Share  # concept-model images with every other attribute of the prompt right
    ordinary: dict[str, float]  # the concept model on ordinary world captions
    baseline_ordinary: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def ordinary_drop(self) -> float | None:
        """Points lost on ordinary captions (objects right), base minus concept model."""
        a, b = self.baseline_ordinary.get("object"), self.ordinary.get("object")
        return None if a is None or b is None else 100 * (a - b)

    def sentences(self) -> list[str]:
        out = []
        for c in self.concepts:
            if c.look is None:
                out.append(f"{c.token}: its training images show no object of the world; no presence measured.")
                continue
            out.append(f"{c.token} ({c.look}) appears in {c.presence.words()} images of its prompts "
                       f"(the base, same prompts without the token: {c.baseline_presence.words()}).")
            if c.colour_presence is not None and c.baseline_colour_presence is not None:
                out.append(f"Its colour alone, on an object of any kind, is in {c.colour_presence.words()} images "
                           f"(base: {c.baseline_colour_presence.words()}).")
            if c.class_presence is not None and c.baseline_class_presence is not None:
                out.append(f'"{c.class_prompt}" gives {c.look} in {c.class_presence.words()} images '
                           f"(base: {c.baseline_class_presence.words()}).")
        if self.all_present is not None:
            n = len(self.concepts)
            out.append(f"{'Both' if n == 2 else f'All {n}'} concepts appear together in {self.all_present.words()} images.")
        out.append(f"The rest of each prompt (size, place, background, other objects) is right in {self.others.words()} images.")
        drop = self.ordinary_drop
        if drop is not None:
            out.append(f"On ordinary captions, objects are drawn right in {100 * self.ordinary['object']:.0f} % of "
                       f"images (base {100 * self.baseline_ordinary['object']:.0f} %: "
                       f"{'a drop of' if drop > 0 else 'a change of'} {abs(drop):.0f} points).")
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ordinary_drop_points"] = self.ordinary_drop
        d["sentences"] = self.sentences()
        for c, cd in zip(self.concepts, d["concepts"]):
            for key in ("presence", "baseline_presence", "colour_presence", "baseline_colour_presence",
                        "class_presence", "baseline_class_presence"):
                share = getattr(c, key)
                if share is not None:
                    cd[key] = {"k": share.k, "n": share.n, "share": share.value}
        for key in ("all_present", "others"):
            share = getattr(self, key)
            d[key] = None if share is None else {"k": share.k, "n": share.n, "share": share.value}
        return d


def _has_colour(reading: O.Reading, look: O.Look) -> bool:
    return any(s.colour == look.colour for s in reading.objects)


def _tally(pairs) -> dict[str, float]:
    t = O.Tally()
    for reading, prompt in pairs:
        if prompt is not None:
            t.add(O.score_sample(reading, prompt))
    return t.shares()


def ordinary_following(images: dict[str, list]) -> dict[str, float]:
    """Prompt following on ordinary world captions: per attribute, the share of `images` (caption -> images) read right."""
    return _tally((O.read(im), O.parse_prompt(p)) for p, ims in images.items() for im in ims)


def score(*, tokens: list[str], looks: list, prompts: list[tuple[str, str]], concept_images: dict,
          base_images: dict, class_prompts: dict[str, str], class_concept: dict, class_base: dict,
          ordinary_concept: dict, ordinary_base: dict) -> WorldScores:
    """Oracle scores of one entry. `prompts`: (prompt with tokens, the same without); `*_images` map a
    prompt to its PIL images; `class_prompts` maps a token to its class prompt."""
    looks_by_token = {t: lk for t, lk in zip(tokens, looks) if lk is not None}
    read = {}

    def readings(images):
        return [read.setdefault(id(im), O.read(im)) for im in images]

    concept_pairs, base_pairs, others, every = [], [], [], []
    present = {t: [] for t in tokens}
    base_present = {t: [] for t in tokens}
    tinted = {t: [] for t in tokens}
    base_tinted = {t: [] for t in tokens}
    for prompt, text in prompts:
        want, want_base = O.parse_prompt(prompt, looks_by_token), O.parse_prompt(text)
        for r in readings(concept_images[prompt]):
            concept_pairs.append((r, want))
            if want is not None:
                scores = O.score_sample(r, want)
                others.append(all(v for k, v in scores.items() if k in OTHERS))
            for t, lk in looks_by_token.items():
                present[t].append(O.concept_present(r, lk))
                tinted[t].append(_has_colour(r, lk))
            every.append(all(O.concept_present(r, lk) for lk in looks_by_token.values()))
        for r in readings(base_images[text]):
            base_pairs.append((r, want_base))
            for t, lk in looks_by_token.items():
                base_present[t].append(O.concept_present(r, lk))
                base_tinted[t].append(_has_colour(r, lk))
    concepts = []
    for t, lk in zip(tokens, looks):
        c = ConceptScores(t, None if lk is None else lk.words(), _share(present[t]), _share(base_present[t]))
        if lk is not None:
            c.colour_presence, c.baseline_colour_presence = _share(tinted[t]), _share(base_tinted[t])
        cp = class_prompts.get(t)
        if lk is not None and cp in class_concept:
            c.class_prompt = cp
            c.class_presence = _share(O.concept_present(r, lk) for r in readings(class_concept[cp]))
            c.baseline_class_presence = _share(O.concept_present(r, lk) for r in readings(class_base[cp]))
        concepts.append(c)
    return WorldScores(
        concepts=concepts,
        all_present=_share(every) if len(looks_by_token) > 1 else None,
        following=_tally(concept_pairs),
        baseline_following=_tally(base_pairs),
        others=_share(others),
        ordinary=ordinary_following(ordinary_concept),
        baseline_ordinary=ordinary_following(ordinary_base),
    )
