"""The contract of `cdiff eval`'s results: what `evaluate_entries` returns, `cdiff eval --json` prints, the
report reads and the manifest keeps (`metrics`), written down once as typed dictionaries.

They stay plain JSON-ready dicts at run time (they are printed and written as JSON, and scripts index them
as `run["entries"][0]["text_alignment"]`); the types give every key, its meaning and its type to readers
and type checkers. Scores are rounded to 4 decimals; a score that was not measured is None.
"""

from __future__ import annotations

from typing import TypedDict


class Scores(TypedDict):
    text_alignment: float | None  # CLIPScore of the images against their prompts without the tokens
    image_alignment: float | None  # mean CLIP cosine to the concept's training images
    image_alignment_dino: float | None  # the same with DINO (None unless asked for)


class ConceptScores(TypedDict):
    """Image alignment of one concept (token) of an entry, against its own training images."""

    token: str
    # `class` (the concept's class word) is a key too; it is a Python keyword, so it is not declared here
    training_images: list[str]  # the files (the manifest keeps their number)
    image_alignment: float | None
    image_alignment_dino: float | None
    baseline_image_alignment: float | None
    baseline_image_alignment_dino: float | None


class PromptRow(TypedDict, total=False):
    """One prompt of the set, with its images: `prompt` (with the tokens), `text` (without), and the scores."""

    prompt: str
    text: str
    kind: str  # recontextualisation, art style, added objects, property change, pair, custom, world...
    images: list[str]  # PNG paths, made with the concept
    baseline_images: list[str]  # PNG paths, made by the base from `text`, same seeds
    text_alignment: float | None
    baseline_text_alignment: float | None


class ClassRow(TypedDict):
    """A class prompt ("photo of a cat") made by the base and by the concept model, same seeds."""

    # `class` (the class word) is a key too
    prompt: str
    images: list[str]
    baseline_images: list[str]
    kid: float | None  # KID x 1000 between the two sets (forgetting)


class Forgetting(TypedDict):
    kid_x1000: float | None  # the mean over the class prompts
    samples_per_class: int
    classes: list[ClassRow]


class ImageSets(TypedDict):
    concept: list[str]
    base: list[str]
    class_concept: list[str]
    class_base: list[str]


class EntryResult(TypedDict):
    """One entry's evaluation."""

    name: str
    id: str
    kind: str  # trained, merged or imported
    tokens: list[str]
    classes: list[str]
    base: str  # the base model's resolved ref
    prompt_set: str  # "builtin", "world" or the file given
    text_alignment: float | None
    image_alignment: float | None
    image_alignment_dino: float | None
    kid: float | None
    baseline: Scores  # the base model on the same prompts without the tokens
    delta: Scores  # entry minus baseline
    forgetting: Forgetting
    per_concept: list[ConceptScores]
    prompts: list[PromptRow]
    images: ImageSets
    world: dict | None  # on a nano-world base: `cdiff_cli.world.scores.WorldScores.to_dict()`, else None
    training_samples: str | None  # the grid of samples made at the end of training, if the entry keeps one
    notes: list[str]
    seconds: float


class Report(TypedDict):
    html: str
    json: str


class EvalRun(TypedDict, total=False):
    """What `evaluate_entries` returns (`report` once the report is written)."""

    cdiff_version: str
    date: str  # UTC, ISO 8601
    models: dict[str, str | None]  # {"clip": ref, "dino": ref or None}
    settings: dict  # `EvalSettings` as a dict (without the model refs)
    kid_features: str  # what KID is computed on
    device: str
    seconds: float
    entries: list[EntryResult]
    report: Report


class ManifestMetrics(TypedDict):
    """The summary of the last evaluation that an entry's manifest keeps (`metrics`): no image paths."""

    date: str
    models: dict[str, str | None]
    settings: dict
    base: str
    prompt_set: str
    prompts: int  # how many
    text_alignment: float | None
    image_alignment: float | None
    image_alignment_dino: float | None
    kid: float | None
    baseline: Scores
    delta: Scores
    per_concept: list[dict]  # ConceptScores with `training_images` as their number
    kid_features: str
    world: dict | None  # {"sentences": [...]}: what the oracle read, in words
    report: str | None  # the HTML report's path
