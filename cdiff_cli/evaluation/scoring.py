"""Scoring what `cdiff eval` generated: features of every image set, text and image alignment, forgetting (KID),
the oracle's reading on a nano-world base, and the summary kept in the manifest."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cdiff_cli.core.prompts import class_prompt
from cdiff_cli.evaluation import metrics as M
from cdiff_cli.evaluation.plan import IMAGE_DIRS, EvalSettings, Plan
from cdiff_cli.evaluation.prompts import to_dict
from cdiff_cli.evaluation.results import (
    ClassRow,
    ConceptScores,
    EntryResult,
    EvalRun,
    ManifestMetrics,
    PromptRow,
)
from cdiff_cli.progress import Progress
from cdiff_cli.training.images import open_rgb


class Features:
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


def settings_dict(s: EvalSettings) -> dict:
    d = asdict(s)
    d.pop("clip"), d.pop("dino")
    return d


def manifest_metrics(run: EvalRun, r: EntryResult) -> ManifestMetrics:
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


def _world_scores(plan: Plan) -> dict:
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


def _saved_rows(plan: Plan, s: EvalSettings, base_ref: str, out_dir: Path) -> tuple[list[PromptRow], list[ClassRow]]:
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


def _image_alignment(sources, clip_g, clip_b, clip_tr: dict, dino) -> list[ConceptScores]:
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


@dataclass
class _Encoded:
    """One entry's image and text features: generated (`g`) and base (`b`) images of its prompts, its
    training images per token (`tr`), DINO's of the same (or None), the class-prompt images, the prompts."""

    g: np.ndarray
    b: np.ndarray
    tr: dict
    dino: tuple | None
    classes: list
    texts: np.ndarray


def _encode(plan: Plan, base_ref: str, feats: Features, s: EvalSettings, progress: Progress) -> _Encoded:
    """Every image through CLIP (and DINO) in batches; shared images are encoded once."""
    name, prompts, sources, imgs, k = plan.entry.name, plan.prompts, plan.sources, plan.images, s.kid_samples
    class_prompts = [cp for _, cp in plan.class_prompts]
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

    g, b, tr = unpack(f_clip)
    return _Encoded(g, b, tr, unpack(f_dino), f_clip[1 + nt + ns :], text_f)


def _forgetting(class_rows: list[dict], cls_clip: list) -> list[float]:
    """KID x 1000 between the base's and the concept's images of each class prompt (same seeds)."""
    kids = []
    for i, row in enumerate(class_rows):
        value = 1000.0 * M.kid(cls_clip[i], cls_clip[len(class_rows) + i], paired=True)
        row["kid"] = _r(value)
        kids.append(value)
    return kids


def score_entry(plan: Plan, base_ref: str, feats: Features, s: EvalSettings, out_dir: Path,
                progress: Progress) -> EntryResult:
    t0 = time.perf_counter()
    prompt_rows, class_rows = _saved_rows(plan, s, base_ref, out_dir)
    enc = _encode(plan, base_ref, feats, s, progress)
    per_img, per_img_base = M.clip_scores(enc.g, enc.texts), M.clip_scores(enc.b, enc.texts)
    for i, row in enumerate(prompt_rows):  # text alignment, per image then per prompt
        row["text_alignment"] = _r(per_img[i * s.n : (i + 1) * s.n].mean())
        row["baseline_text_alignment"] = _r(per_img_base[i * s.n : (i + 1) * s.n].mean())
    per_concept = _image_alignment(plan.sources, enc.g, enc.b, enc.tr, enc.dino)
    kids = _forgetting(class_rows, enc.classes)
    scores = {"text": float(per_img.mean()), "text_base": float(per_img_base.mean()),
              **{key: _mean([c[field] for c in per_concept]) for key, field in (
                  ("img", "image_alignment"), ("img_base", "baseline_image_alignment"),
                  ("img_d", "image_alignment_dino"), ("img_d_base", "baseline_image_alignment_dino"))},
              "kid": _mean(kids)}
    for c in per_concept:
        for key in list(c):
            if key.startswith(("image_alignment", "baseline_image")):
                c[key] = _r(c[key])
    return _entry_result(plan, base_ref, s, scores, per_concept, prompt_rows, class_rows,
                         round(plan.seconds + time.perf_counter() - t0, 2))


def _entry_result(plan: Plan, base_ref: str, s: EvalSettings, sc: dict, per_concept: list[ConceptScores],
                  prompt_rows: list[PromptRow], class_rows: list[ClassRow], seconds: float) -> EntryResult:
    """An entry's result, as `cdiff eval --json` prints it and the report reads it."""
    entry = plan.entry
    return {
        "name": entry.name,
        "id": entry.id,
        "kind": entry.kind,
        "tokens": entry.tokens,
        "classes": [src.class_word for src in plan.sources],
        "base": base_ref,
        "prompt_set": plan.prompt_set,
        "text_alignment": _r(sc["text"]),
        "image_alignment": _r(sc["img"]),
        "image_alignment_dino": _r(sc["img_d"]),
        "kid": _r(sc["kid"]),
        "baseline": {"text_alignment": _r(sc["text_base"]), "image_alignment": _r(sc["img_base"]),
                     "image_alignment_dino": _r(sc["img_d_base"])},
        "delta": {"text_alignment": _r(sc["text"] - sc["text_base"]), "image_alignment": _r(_sub(sc["img"], sc["img_base"])),
                  "image_alignment_dino": _r(_sub(sc["img_d"], sc["img_d_base"]))},
        "forgetting": {"kid_x1000": _r(sc["kid"]), "samples_per_class": s.kid_samples if class_rows else 0,
                       "classes": class_rows},
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
        "seconds": seconds,
    }


def _clean(folder: Path) -> None:
    if folder.is_dir():
        for p in folder.glob("*.png"):
            p.unlink()


def _save(images, folder: Path, prompt: str, params: dict) -> list[str]:
    from cdiff_cli.generation import save_pngs

    return [str(p) for p in save_pngs(images, folder, prompt, params)]
