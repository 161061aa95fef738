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
import time
from pathlib import Path

from cdiff_cli import __version__
from cdiff_cli.errors import CdiffError
from cdiff_cli.evaluation.plan import KID_FEATURES_NOTE, EvalSettings, Plan, plan_entry
from cdiff_cli.evaluation.results import EvalRun
from cdiff_cli.evaluation.scoring import Features, manifest_metrics, score_entry, settings_dict
from cdiff_cli.progress import SILENT, Progress
from cdiff_cli.registry import Registry

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


# -- scoring -----------------------------------------------------------------------------------------


# -- the workflow ------------------------------------------------------------------------------------


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
) -> EvalRun:
    """Evaluate registry entries; returns the run (settings, models, one result per entry).

    Writes OUT/NAME/{concept,base,class-concept,class-base}/*.png, OUT/report.html and OUT/report.json,
    and (if `store`) a summary under `metrics` in each entry's manifest.

    Each entry's images come from `prepare_pipeline` (the base with the entry's delta written in, base
    checked); the baseline images from the plain base, loaded once per base for all its entries."""
    from cdiff_cli.evaluation.features import load_clip, load_dino
    from cdiff_cli.evaluation.report import write_report
    from cdiff_cli.generation import SCHEDULERS
    from cdiff_cli.models.base import pick_device

    settings.check()
    registry.check_outside(out_dir)  # eval replaces the PNGs of its own subfolders there
    if not names:
        raise CdiffError("give at least one concept name to evaluate")
    if len(set(names)) != len(names):
        raise CdiffError("each concept may be named only once")
    if settings.scheduler not in SCHEDULERS:
        raise CdiffError(f"unknown scheduler {settings.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    plans = [plan_entry(registry.get(n), registry, settings, base) for n in names]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    clip = load_clip(settings.clip, dev)
    dino = load_dino(settings.dino, dev) if settings.dino else None
    feats = Features(clip, dino)
    t_run = time.perf_counter()
    s = settings

    groups: dict[str | None, list[Plan]] = {}
    for plan in plans:
        groups.setdefault(base or plan.entry.base.get("ref"), []).append(plan)
    base_refs: dict[str, str] = {}
    for ref, group in groups.items():
        # The concept models first: a base that does not match an entry fails before anything else runs.
        for plan in group:
            base_refs[plan.entry.name] = _generate_with_concept(registry, plan, ref, device, s, progress)
        _generate_with_base(registry, group, ref, device, s, progress)

    results = [score_entry(plan, base_refs[plan.entry.name], feats, s, out_dir, progress) for plan in plans]
    run = {
        "cdiff_version": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "models": {"clip": clip.ref, "dino": dino.ref if dino else None},
        "settings": settings_dict(settings),
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


def _generate_with_concept(registry: Registry, plan: Plan, ref: str | None, device, s: EvalSettings,
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


def _generate_with_base(registry: Registry, group: list[Plan], ref: str | None, device, s: EvalSettings,
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


