"""`cdiff eval`: generate images of registry entries on a prompt set and score them.

For each entry:
- text alignment: CLIPScore of the concept model's images against their prompts with the modifier
  tokens removed;
- image alignment: mean cosine (CLIP, and DINO when asked) between the generated images and the
  concept's training images, per concept for entries with several tokens;
- the baseline: the same token-free prompts on the base model, same seeds; `delta` = concept - base;
- forgetting: KID x 1000 between base-model and concept-model images of "photo of a {class}",
  same seeds, on CLIP image features (no Inception network offline).

`evaluate_entries` returns plain data, writes the PNGs and the report into the output folder, and
stores a summary in each entry's manifest (`metrics`). It never prints.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cdiff_cli import __version__
from cdiff_cli.core.prompts import class_prompt
from cdiff_cli.core.tokens import canonical
from cdiff_cli.errors import CdiffError, option_error
from cdiff_cli.evaluation import metrics as M
from cdiff_cli.evaluation.features import DEFAULT_CLIP
from cdiff_cli.evaluation.prompts import EvalPrompt, select_prompts, strip_tokens, to_dict
from cdiff_cli.progress import SILENT, Progress
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


# -- generation --------------------------------------------------------------------------------------


def _sample(pipe, prompt: str, n: int, s: EvalSettings, task) -> list:
    from cdiff_cli.generation import sample

    return sample(pipe, prompt, n=n, steps=s.steps, guidance=s.guidance, seed=s.seed, height=s.height,
                  width=s.width, batch_size=s.batch_size, on_image=task.advance)


def _release_memory() -> None:
    """After `del pipe`: give the memory back before the next model is loaded."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _clean(folder: Path) -> None:
    if folder.is_dir():
        for p in folder.glob("*.png"):
            p.unlink()


def _save(images, folder: Path, prompt: str, params: dict) -> list[str]:
    from cdiff_cli.generation import save_pngs

    return [str(p) for p in save_pngs(images, folder, prompt, params)]


# -- scoring -----------------------------------------------------------------------------------------


class _Features:
    """Batched feature extraction with a cache keyed by what the images are, so base images and
    training images shared by several entries are encoded once."""

    def __init__(self, clip, dino):
        self.clip, self.dino = clip, dino
        self.cache: dict[tuple, np.ndarray] = {}

    def _todo(self, items: list[tuple[tuple, list]], model: str) -> dict[tuple, list]:
        todo: dict[tuple, list] = {}
        for key, images in items:
            if (model,) + key not in self.cache and images:
                todo.setdefault(key, images)
        return todo

    def cost(self, items: list[tuple[tuple, list]], model: str = "clip") -> int:
        """How many images `encode(items, model=model)` will run through the model."""
        if (self.clip if model == "clip" else self.dino) is None:
            return 0
        return sum(len(ims) for ims in self._todo(items, model).values())

    def encode(self, items: list[tuple[tuple, list]], task, model: str = "clip") -> list[np.ndarray] | None:
        """Features of each (key, images) item; every image not cached yet goes through the model in
        one batched pass."""
        scorer = self.clip if model == "clip" else self.dino
        if scorer is None:
            return None
        todo = self._todo(items, model)
        flat = [im for ims in todo.values() for im in ims]
        if flat:
            f = scorer.images(flat, task)
            i = 0
            for key, ims in todo.items():
                self.cache[(model,) + key] = f[i : i + len(ims)]
                i += len(ims)
        return [self.cache.get((model,) + key) for key, _ in items]

    def texts(self, texts: list[str]) -> np.ndarray:
        todo = [t for t in dict.fromkeys(texts) if ("text", t) not in self.cache]
        if todo:
            for t, f in zip(todo, self.clip.texts(todo)):
                self.cache[("text", t)] = f
        return np.stack([self.cache[("text", t)] for t in texts])


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _sub(a, b):
    return None if a is None or b is None else a - b


# -- the workflow ------------------------------------------------------------------------------------


@dataclass
class _Plan:
    entry: Entry
    prompts: list[EvalPrompt]
    prompt_set: str
    sources: list[ConceptSource]
    notes: list[str]
    class_prompts: list[tuple[str, str]] = field(default_factory=list)  # (class, "photo of a {class}")
    images: dict = field(default_factory=dict)  # ("concept"|"base", prompt) -> list of PIL images
    seconds: float = 0.0
    world: _WorldPlan | None = None  # the base is a nano-world model: oracle scores too


@dataclass
class _WorldPlan:
    looks: list  # per token: the oracle's Look of its training images (None: not a world object)
    ordinary: list[str]  # world captions with no concept, for the drift in prompt following


def _plan(e: Entry, registry: Registry, settings: EvalSettings, base: str | None) -> _Plan:
    """What to generate for one entry (everything that can fail cheaply, before any model is loaded)."""
    from cdiff_cli.world import scores as world_eval

    sources, notes = concept_sources(registry, e)
    world = None
    if world_eval.is_world_base(_base_ref(base or e.base.get("ref"))):
        from cdiff_cli.world import oracle

        looks = [oracle.learn_look([open_rgb(f) for f in src.files]) if src.files else None for src in sources]
        world = _WorldPlan(looks, world_eval.ordinary_prompts())
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
    return _Plan(e, prompts, desc, sources, notes, [(c, class_prompt(c)) for c in classes], world=world)


def _base_ref(ref: str | None) -> str | None:
    """The folder a base name stands for (`nano` -> the packaged model), or None when it is not local."""
    from cdiff_cli.base import resolve_base

    if not ref:
        return None
    try:
        return resolve_base(ref).ref
    except CdiffError:
        return None


def evaluate_entries(
    registry: Registry,
    names: list[str],
    settings: EvalSettings,
    out_dir: str | Path,
    *,
    base: str | None = None,
    device: str | None = "auto",
    store: bool = True,
    progress: Progress = SILENT,
) -> dict:
    """Evaluate registry entries; returns the run (settings, models, one result per entry).

    Writes OUT/NAME/{concept,base,class-concept,class-base}/*.png, OUT/report.html and OUT/report.json,
    and (if `store`) a summary under `metrics` in each entry's manifest.

    Each entry's images come from `prepare_pipeline` (the base with the entry's delta written in, base
    checked); the baseline images from the plain base, loaded once per base for all its entries."""
    from cdiff_cli.base import pick_device
    from cdiff_cli.evaluation.features import load_clip, load_dino
    from cdiff_cli.evaluation.report import write_report
    from cdiff_cli.generation import SCHEDULERS

    settings.check()
    registry.check_outside(out_dir)  # eval replaces the PNGs of its own subfolders there
    if not names:
        raise CdiffError("give at least one concept name to evaluate")
    if len(set(names)) != len(names):
        raise CdiffError("each concept may be named only once")
    if settings.scheduler not in SCHEDULERS:
        raise CdiffError(f"unknown scheduler {settings.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    plans = [_plan(registry.get(n), registry, settings, base) for n in names]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    clip = load_clip(settings.clip, dev)
    dino = load_dino(settings.dino, dev) if settings.dino else None
    feats = _Features(clip, dino)
    t_run = time.perf_counter()
    s = settings

    groups: dict[str | None, list[_Plan]] = {}
    for plan in plans:
        groups.setdefault(base or plan.entry.base.get("ref"), []).append(plan)
    base_refs: dict[str, str] = {}
    for ref, group in groups.items():
        # The concept models first: a base that does not match an entry fails before anything else runs.
        for plan in group:
            base_refs[plan.entry.name] = _generate_with_concept(registry, plan, ref, device, s, progress)
        _generate_with_base(registry, group, ref, device, s, progress)

    results = [_score_one(plan, base_refs[plan.entry.name], feats, s, out_dir, progress) for plan in plans]
    run = {
        "cdiff_version": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "models": {"clip": clip.ref, "dino": dino.ref if dino else None},
        "settings": _settings_dict(settings),
        "kid_features": KID_FEATURES_NOTE,
        "device": str(dev),
        "seconds": round(time.perf_counter() - t_run, 2),
        "out_dir": str(out_dir.resolve()),
        "entries": results,
    }
    html_path, json_path = write_report(run, out_dir)
    run["report"] = {"html": str(html_path.resolve()), "json": str(json_path.resolve())}
    if store:
        for r in run["entries"]:
            registry.update_manifest(r["name"], metrics=manifest_metrics(run, r))
    return run


def _generate_with_concept(registry: Registry, plan: _Plan, ref: str | None, device, s: EvalSettings,
                           progress: Progress) -> str:
    """The entry's pictures: its prompts, its class prompts and (nano world) the ordinary captions, with the
    entry's delta written into the base. Returns the base's resolved ref."""
    from cdiff_cli.generation import prepare_pipeline, set_scheduler

    t0, k = time.perf_counter(), s.kid_samples
    spec, pipe, _ = prepare_pipeline(registry, [plan.entry], base=ref, device=device, precision=s.precision,
                                     progress=progress)
    set_scheduler(pipe, s.scheduler)
    ordinary = plan.world.ordinary if plan.world else []
    total = (len(plan.prompts) + len(ordinary)) * s.n + len(plan.class_prompts) * k
    with progress.task(f"{plan.entry.name}: generating", total) as task:
        for p in plan.prompts:
            plan.images[("concept", p.prompt)] = _sample(pipe, p.prompt, s.n, s, task)
        for _, cp in plan.class_prompts:
            plan.images[("concept", cp)] = _sample(pipe, cp, k, s, task)
        for op in ordinary:
            plan.images[("ordinary-concept", op)] = _sample(pipe, op, s.n, s, task)
    del pipe
    _release_memory()
    plan.seconds += time.perf_counter() - t0
    return spec.ref


def _generate_with_base(registry: Registry, group: list[_Plan], ref: str | None, device, s: EvalSettings,
                        progress: Progress) -> None:
    """The base model's pictures, once for every prompt of the group (without the tokens), the class prompts
    and the ordinary captions; shared by the entries that use them."""
    from cdiff_cli.generation import prepare_pipeline, set_scheduler

    t0, k = time.perf_counter(), s.kid_samples
    todo = list(dict.fromkeys([(p.text, s.n) for plan in group for p in plan.prompts]
                              + [(cp, k) for plan in group for _, cp in plan.class_prompts]
                              + [(op, s.n) for plan in group if plan.world for op in plan.world.ordinary]))
    _, pipe, _ = prepare_pipeline(registry, [], base=ref or group[0].entry.base.get("ref"), device=device,
                                  precision=s.precision, progress=progress)
    set_scheduler(pipe, s.scheduler)
    done = {}
    with progress.task("base model: generating", sum(n for _, n in todo)) as task:
        for prompt, n in todo:
            done[(prompt, n)] = _sample(pipe, prompt, n, s, task)
    del pipe
    _release_memory()
    for plan in group:
        for p in plan.prompts:
            plan.images[("base", p.text)] = done[(p.text, s.n)]
        for _, cp in plan.class_prompts:
            plan.images[("base", cp)] = done[(cp, k)]
        for op in plan.world.ordinary if plan.world else []:
            plan.images[("ordinary-base", op)] = done[(op, s.n)]
        plan.seconds += (time.perf_counter() - t0) / len(group)


def _settings_dict(s: EvalSettings) -> dict:
    d = asdict(s)
    d.pop("clip"), d.pop("dino")
    return d


def manifest_metrics(run: dict, r: dict) -> dict:
    """The summary kept in an entry's manifest: scores, date, models and settings (no image paths)."""
    return {
        "date": run["date"],
        "models": run["models"],
        "settings": run["settings"],
        "base": r["base"],
        "prompt_set": r["prompt_set"],
        "prompts": len(r["prompts"]),
        "text_alignment": r["text_alignment"],
        "image_alignment": r["image_alignment"],
        "image_alignment_dino": r["image_alignment_dino"],
        "kid": r["kid"],
        "baseline": r["baseline"],
        "delta": r["delta"],
        "per_concept": [{**{k: v for k, v in c.items() if k != "training_images"}, "training_images": len(c["training_images"])}
                        for c in r["per_concept"]],
        "kid_features": run["kid_features"],
        "world": None if not r.get("world") else {"sentences": r["world"]["sentences"]},
        "report": run.get("report", {}).get("html"),
    }


def _world_scores(plan: _Plan) -> dict:
    """The oracle's scores of an entry on a nano-world base (see cdiff_cli.world.scores)."""
    from cdiff_cli.world import scores as world_eval

    imgs = plan.images
    ordinary = plan.world.ordinary
    scores = world_eval.score(
        tokens=[src.token for src in plan.sources], looks=plan.world.looks,
        prompts=[(p.prompt, p.text) for p in plan.prompts],
        concept_images={p.prompt: imgs[("concept", p.prompt)] for p in plan.prompts},
        base_images={p.text: imgs[("base", p.text)] for p in plan.prompts},
        class_prompts={src.token: class_prompt(src.class_word) for src in plan.sources if src.class_word},
        class_concept={cp: imgs[("concept", cp)] for _, cp in plan.class_prompts},
        class_base={cp: imgs[("base", cp)] for _, cp in plan.class_prompts},
        ordinary_concept={op: imgs[("ordinary-concept", op)] for op in ordinary},
        ordinary_base={op: imgs[("ordinary-base", op)] for op in ordinary})
    return scores.to_dict()


def _saved_rows(plan: _Plan, s: EvalSettings, base_ref: str, out_dir: Path) -> tuple[list[dict], list[dict]]:
    """The PNGs (each carries its generation parameters; a re-run into the same folder replaces them), as the
    report's rows: one per prompt, one per class prompt."""
    entry, prompts, imgs, name = plan.entry, plan.prompts, plan.images, plan.entry.name
    folder = out_dir / name
    for d in IMAGE_DIRS:
        _clean(folder / d)
    params = {"steps": s.steps, "guidance": s.guidance, "seed": s.seed, "height": s.height, "width": s.width,
              "scheduler": s.scheduler, "base": base_ref, "eval": True}
    cparams = {**params, "concepts": [name], "tokens": entry.tokens}
    bparams = {**params, "concepts": [], "tokens": []}
    prompt_rows = [{**to_dict(p),
                    "images": _save(imgs[("concept", p.prompt)], folder / "concept", p.prompt, cparams),
                    "baseline_images": _save(imgs[("base", p.text)], folder / "base", p.text, bparams)}
                   for p in prompts]
    class_rows = [{"class": c, "prompt": cp,
                   "images": _save(imgs[("concept", cp)], folder / "class-concept", cp, cparams),
                   "baseline_images": _save(imgs[("base", cp)], folder / "class-base", cp, bparams)}
                  for c, cp in plan.class_prompts]
    return prompt_rows, class_rows


def _image_alignment(sources, clip_g, clip_b, clip_tr: dict, dino) -> list[dict]:
    """Image alignment per concept, each against its own training images (CLIP, and DINO when loaded)."""
    per_concept = []
    for src in sources:
        c = {"token": src.token, "class": src.class_word, "training_images": [str(f) for f in src.files],
             "image_alignment": None, "image_alignment_dino": None,
             "baseline_image_alignment": None, "baseline_image_alignment_dino": None}
        if clip_tr.get(src.token) is not None:
            c["image_alignment"] = M.mean_cosine(clip_g, clip_tr[src.token])
            c["baseline_image_alignment"] = M.mean_cosine(clip_b, clip_tr[src.token])
            if dino is not None:
                c["image_alignment_dino"] = M.mean_cosine(dino[0], dino[2][src.token])
                c["baseline_image_alignment_dino"] = M.mean_cosine(dino[1], dino[2][src.token])
        per_concept.append(c)
    return per_concept


def _score_one(plan: _Plan, base_ref: str, feats: _Features, s: EvalSettings, out_dir: Path, progress: Progress) -> dict:
    t0 = time.perf_counter()
    entry, prompts, sources, k = plan.entry, plan.prompts, plan.sources, s.kid_samples
    name, imgs = entry.name, plan.images
    class_prompts = [cp for _, cp in plan.class_prompts]

    prompt_rows, class_rows = _saved_rows(plan, s, base_ref, out_dir)

    # Features: every image through CLIP (and DINO) in batches; shared images are encoded once.
    train_imgs = {src.token: [open_rgb(f) for f in src.files] for src in sources}
    texts_u = list(dict.fromkeys(p.text for p in prompts))
    items = ([(("concept", name, "prompts"), [im for p in prompts for im in imgs[("concept", p.prompt)]])]
             + [(("base", base_ref, t, s.n), imgs[("base", t)]) for t in texts_u]
             + [(("train",) + tuple(str(f) for f in src.files), train_imgs[src.token]) for src in sources]
             + [(("base", base_ref, cp, k), imgs[("base", cp)]) for cp in class_prompts]
             + [(("concept", name, cp), imgs[("concept", cp)]) for cp in class_prompts])
    nt, ns = len(texts_u), len(sources)
    aligned = items[: 1 + nt + ns]  # what DINO needs; KID's class images use CLIP only
    with progress.task(f"{name}: scoring", feats.cost(items) + feats.cost(aligned, "dino")) as task:
        f_clip = feats.encode(items, task, "clip")
        f_dino = feats.encode(aligned, task, "dino")
        text_f = feats.texts([p.text for p in prompts for _ in range(s.n)])

    def unpack(f):
        if f is None:
            return None
        by_text = dict(zip(texts_u, f[1 : 1 + nt]))
        return (f[0], np.concatenate([by_text[p.text] for p in prompts]),
                {src.token: f[1 + nt + j] for j, src in enumerate(sources)})

    clip_g, clip_b, clip_tr = unpack(f_clip)
    dino = unpack(f_dino)
    cls_clip = f_clip[1 + nt + ns :]

    # Text alignment, per image then per prompt.
    per_img = M.clip_scores(clip_g, text_f)
    per_img_base = M.clip_scores(clip_b, text_f)
    for i, row in enumerate(prompt_rows):
        row["text_alignment"] = _r(per_img[i * s.n : (i + 1) * s.n].mean())
        row["baseline_text_alignment"] = _r(per_img_base[i * s.n : (i + 1) * s.n].mean())

    per_concept = _image_alignment(sources, clip_g, clip_b, clip_tr, dino)

    # Forgetting: base vs concept images of the class prompts, same seeds.
    kids = []
    for i, row in enumerate(class_rows):
        value = 1000.0 * M.kid(cls_clip[i], cls_clip[len(class_rows) + i], paired=True)
        row["kid"] = _r(value)
        kids.append(value)

    text, text_base = float(per_img.mean()), float(per_img_base.mean())
    img = _mean([c["image_alignment"] for c in per_concept])
    img_base = _mean([c["baseline_image_alignment"] for c in per_concept])
    img_d = _mean([c["image_alignment_dino"] for c in per_concept])
    img_d_base = _mean([c["baseline_image_alignment_dino"] for c in per_concept])
    kid = _mean(kids)
    for c in per_concept:
        for key in list(c):
            if key.startswith(("image_alignment", "baseline_image")):
                c[key] = _r(c[key])
    return {
        "name": name,
        "id": entry.id,
        "kind": entry.kind,
        "tokens": entry.tokens,
        "classes": [src.class_word for src in sources],
        "base": base_ref,
        "prompt_set": plan.prompt_set,
        "text_alignment": _r(text),
        "image_alignment": _r(img),
        "image_alignment_dino": _r(img_d),
        "kid": _r(kid),
        "baseline": {"text_alignment": _r(text_base), "image_alignment": _r(img_base), "image_alignment_dino": _r(img_d_base)},
        "delta": {"text_alignment": _r(text - text_base), "image_alignment": _r(_sub(img, img_base)),
                  "image_alignment_dino": _r(_sub(img_d, img_d_base))},
        "forgetting": {"kid_x1000": _r(kid), "samples_per_class": k if class_rows else 0, "classes": class_rows},
        "per_concept": per_concept,
        "prompts": prompt_rows,
        "images": {
            "concept": [p for r in prompt_rows for p in r["images"]],
            "base": [p for r in prompt_rows for p in r["baseline_images"]],
            "class_concept": [p for r in class_rows for p in r["images"]],
            "class_base": [p for r in class_rows for p in r["baseline_images"]],
        },
        "world": _world_scores(plan) if plan.world else None,
        "training_samples": str(entry.samples_path) if entry.samples_path else None,
        "notes": plan.notes,
        "seconds": round(plan.seconds + time.perf_counter() - t0, 2),
    }
