"""What `cdiff eval` will do: its settings (`EvalSettings`, checked), and per entry the plan: prompts, class
prompts, where the concept's training images are, and (nano world) what the oracle looks for."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from cdiff_cli.core.prompts import class_prompt
from cdiff_cli.core.tokens import canonical
from cdiff_cli.errors import CdiffError, option_error
from cdiff_cli.evaluation.features import DEFAULT_CLIP
from cdiff_cli.evaluation.prompts import EvalPrompt, select_prompts, strip_tokens
from cdiff_cli.registry import Entry, Registry
from cdiff_cli.training.images import open_rgb

KID_FEATURES_NOTE = (
    "KID is computed on CLIP image embeddings (the projected, unnormalised image features of the --clip model, "
    "as clean-fid's CLIP mode does), because the Inception network is not available offline; the values are not "
    "comparable with Inception-feature KID numbers such as the paper's. Both image sets come from the same seeds, "
    "so the estimator leaves the same-seed pairs out of the cross term (paired U-statistic; 0 = no change)."
)


IMAGE_DIRS = ("concept", "base", "class-concept", "class-base")


@dataclass
class EvalSettings:
    n: int = 2  # images per prompt
    steps: int = 25
    guidance: float = 6.0
    seed: int = 0
    height: int | None = None
    width: int | None = None
    scheduler: str = "dpm"
    batch_size: int = 4
    max_prompts: int | None = None
    prompt_file: str | None = None
    kid_samples: int = 8  # images of "photo of a {class}" per model; 0 = no forgetting measure
    clip: str = DEFAULT_CLIP
    dino: str | None = None
    precision: str = "fp16"

    def check(self) -> None:
        if self.n < 1 or self.steps < 1 or self.batch_size < 1:
            raise option_error("{n}, {steps} and {batch_size} must be at least 1", "n", "steps", "batch_size")
        if not math.isfinite(self.guidance):
            raise option_error("{guidance} must be a finite number, not {value}", "guidance", value=self.guidance)
        if self.kid_samples == 1 or self.kid_samples < 0:
            raise option_error("{kid_samples} must be 0 (no forgetting measure) or at least 2", "kid_samples")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise option_error("{max_prompts} must be at least 1", "max_prompts")


@dataclass
class ConceptSource:
    token: str
    class_word: str
    files: list[Path] = field(default_factory=list)


def concept_sources(registry: Registry, entry: Entry) -> tuple[list[ConceptSource], list[str]]:
    """Each token of the entry with its class and training images (for merged entries, found in the
    parents' manifests). Returns (sources, notes about what is missing)."""
    notes: list[str] = []
    found: dict[str, tuple[str, Path, list[str]]] = {}

    def collect(e: Entry, depth: int = 0) -> None:
        for c in e.manifest.get("concepts", []) or []:
            found.setdefault(canonical(c.get("token", "")), (c.get("class", ""), Path(c.get("images_dir", "")),
                                                             [i["file"] for i in c.get("images", [])]))
        if e.kind == "merged" and depth < 8:
            for parent in e.parents:
                try:
                    collect(registry.get(parent), depth + 1)
                except CdiffError:
                    notes.append(f"parent {parent!r} of {e.name!r} is no longer in the registry")

    collect(entry)
    classes = entry.classes + [""] * (len(entry.tokens) - len(entry.classes))
    out = []
    for tok, cls in zip(entry.tokens, classes):
        src = ConceptSource(tok, cls)
        rec = found.get(canonical(tok))
        if rec is None:
            why = "imported entries carry no training images" if entry.kind == "imported" else "no training images recorded"
            notes.append(f"{entry.name}: image alignment of {tok} skipped ({why})")
        else:
            cls2, folder, files = rec
            src.class_word = cls or cls2
            present = [folder / f for f in files if (folder / f).is_file()]
            if len(present) < len(files):
                notes.append(f"{entry.name}: {len(files) - len(present)} of {len(files)} training image(s) of {tok} "
                             f"are missing from {folder}")
            if not present:
                notes.append(f"{entry.name}: image alignment of {tok} skipped (no training image found in {folder})")
            src.files = present
        if not src.class_word:
            notes.append(f"{entry.name}: {tok} has no class word (prompts use the token alone; no forgetting measure)")
        out.append(src)
    return out, notes


@dataclass
class Plan:
    entry: Entry
    prompts: list[EvalPrompt]
    prompt_set: str
    sources: list[ConceptSource]
    notes: list[str]
    class_prompts: list[tuple[str, str]] = field(default_factory=list)  # (class, "photo of a {class}")
    images: dict = field(default_factory=dict)  # ("concept"|"base", prompt) -> list of PIL images
    seconds: float = 0.0
    world: WorldPlan | None = None  # the base is a nano-world model: oracle scores too


@dataclass
class WorldPlan:
    looks: list  # per token: the oracle's Look of its training images (None: not a world object)
    ordinary: list[str]  # world captions with no concept, for the drift in prompt following


def plan_entry(e: Entry, registry: Registry, settings: EvalSettings, base: str | None) -> Plan:
    """What to generate for one entry (everything that can fail cheaply, before any model is loaded)."""
    from cdiff_cli.world import scores as world_eval

    sources, notes = concept_sources(registry, e)
    world = None
    if world_eval.is_world_base(base_ref_of(base or e.base.get("ref"))):
        from cdiff_cli.world import oracle

        looks = [oracle.learn_look([open_rgb(f) for f in src.files]) if src.files else None for src in sources]
        world = WorldPlan(looks, world_eval.ordinary_prompts())
    if world is not None and settings.prompt_file is None:
        phrases = [f"{src.token} {src.class_word}".strip() for src in sources]
        texts = world_eval.concept_prompts(phrases, world.looks)
        if settings.max_prompts:
            texts = texts[: settings.max_prompts]
        prompts = [EvalPrompt(t, strip_tokens(t, e.tokens), "world") for t in texts]
        desc = "built-in: nano world"
    else:
        prompts, desc = select_prompts(e.tokens, e.classes, prompt_file=settings.prompt_file,
                                       max_prompts=settings.max_prompts)
    classes = list(dict.fromkeys(c.class_word for c in sources if c.class_word)) if settings.kid_samples else []
    if not settings.kid_samples:
        notes.append(f"{e.name}: forgetting not measured (--kid-samples 0)")
    return Plan(e, prompts, desc, sources, notes, [(c, class_prompt(c)) for c in classes], world=world)


def base_ref_of(ref: str | None) -> str | None:
    """The folder a base name stands for (`nano` -> the packaged model), or None when it is not local."""
    from cdiff_cli.models.base import resolve_base

    if not ref:
        return None
    try:
        return resolve_base(ref).ref
    except CdiffError:
        return None
