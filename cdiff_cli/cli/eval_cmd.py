"""cdiff eval: score concepts on a prompt set (text and image alignment, baseline, forgetting)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cdiff_cli.cli._app import command
from cdiff_cli.cli._options import Base, Device, Json, Precision, registry
from cdiff_cli.cli._term import term
from cdiff_cli.defaults import DEFAULT_CLIP, LIMITS, PAPER_DINO, SCHEDULERS


@command("eval", loads_models=True)
def eval_cmd(
    names: Annotated[list[str], typer.Argument(help="Concept name(s) to evaluate.", show_default=False)],
    n: Annotated[int, typer.Option("-n", "--num", min=1, max=LIMITS.images, help="Images per prompt.")] = 2,
    steps: Annotated[int, typer.Option(min=1, max=LIMITS.sample_steps, help="Sampling steps.")] = 25,
    guidance: Annotated[float, typer.Option(min=0.0, max=LIMITS.guidance, help="Classifier-free guidance scale.")] = 6.0,
    seed: Annotated[int, typer.Option(min=0, max=LIMITS.seed, help="Seed of the first image of every prompt; image i uses seed + i (same for the base).")] = 0,
    height: Annotated[Optional[int], typer.Option(min=8, max=LIMITS.resolution, help="Image height (default: the base's native size).", show_default=False)] = None,
    width: Annotated[Optional[int], typer.Option(min=8, max=LIMITS.resolution, help="Image width (default: the base's native size).", show_default=False)] = None,
    scheduler: Annotated[str, typer.Option(help=f"Sampler: {', '.join(SCHEDULERS)}.")] = "dpm",
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="Prompt file, one per line: '{}' is 'TOKEN CLASS', "
                                                    "'{0}', '{1}' one concept each; lines without a placeholder are used as is. "
                                                    "Default: the built-in set for the concept's class.", show_default=False)] = None,
    max_prompts: Annotated[Optional[int], typer.Option("--max-prompts", min=1, max=LIMITS.images, help="Use only the first K prompts (default: all).", show_default=False)] = None,
    kid_samples: Annotated[int, typer.Option("--kid-samples", min=0, max=LIMITS.images, help="Images of 'photo of a CLASS' per model for the forgetting KID (0: skip).")] = 8,
    clip: Annotated[str, typer.Option("--clip", help="CLIP model (hub id or local folder) for text and image alignment.")] = DEFAULT_CLIP,
    dino: Annotated[Optional[str], typer.Option("--dino", help=f"Also score image alignment with this DINO/ViT model (the paper: {PAPER_DINO}).", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Output folder for images and the report. Default: cdiff-eval/NAME[+NAME...].", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=LIMITS.gen_batch_size, help="Images per pipeline call.")] = 4,
    save: Annotated[bool, typer.Option("--save/--no-save", help="Store the scores in each concept's manifest (shown by `cdiff show`/`list`).")] = True,
    base: Base = None,
    precision: Annotated[Precision, typer.Option(help="Weights precision on a GPU.")] = Precision.fp16,
    device: Device = "auto",
    as_json: Json = False,
):
    """Score concepts against their base model, with an HTML report.

    Text alignment (CLIPScore), image alignment to the training images, the same prompts on the base model, and forgetting (KID of class images).

    The prompts are the built-in CustomConcept101-style set for each concept's class (pair prompts for entries with several tokens). Text alignment uses each prompt without the modifier token.

    On a nano-world base (the shipped `nano`), the prompts are world prompts that place each concept in new contexts, and an oracle that reads the pictures adds concept presence, prompt following and drift, in counts ("appears in 17 of 20 images").
    """
    from cdiff_cli.evaluation import EvalSettings, evaluate_entries

    settings = EvalSettings(n=n, steps=steps, guidance=guidance, seed=seed, height=height, width=width,
                            scheduler=scheduler, batch_size=batch_size, max_prompts=max_prompts,
                            prompt_file=str(prompts) if prompts else None, kid_samples=kid_samples,
                            clip=clip, dino=dino, precision=precision.value)
    out_dir = out or Path("cdiff-eval") / "+".join(names)
    run = evaluate_entries(registry(), names, settings, out_dir, base=base, device=device, store=save,
                           progress=term.progress())
    for r in run["entries"]:
        for note in r["notes"]:
            term.warn(note)
    if as_json:
        results = [{**r, "models": run["models"], "settings": run["settings"], "report": run["report"]}
                   for r in run["entries"]]
        term.json(results[0] if len(results) == 1 else results)
        return
    dino_on = any(r["image_alignment_dino"] is not None for r in run["entries"])

    def f(x, nd=3, signed=False):
        if x is None:
            return "-"
        x = x if round(x, nd) != 0 else 0.0  # no "-0.000"
        return f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}"

    cols = ["NAME", "TEXT", "IMAGE"] + (["DINO"] if dino_on else []) + ["KIDx1000", "BASE TEXT", "BASE IMAGE", "ΔTEXT", "ΔIMAGE"]
    rows = []
    for r in run["entries"]:
        b, d = r["baseline"], r["delta"]
        rows.append([r["name"], f(r["text_alignment"]), f(r["image_alignment"])]
                    + ([f(r["image_alignment_dino"])] if dino_on else [])
                    + [f(r["kid"], 2), f(b["text_alignment"]), f(b["image_alignment"]),
                       f(d["text_alignment"], signed=True), f(d["image_alignment"], signed=True)])
    term.table(cols, rows)
    for r in run["entries"]:
        if r.get("world"):  # a nano-world base: what the oracle reads in the pictures
            for line in r["world"]["sentences"]:
                term.data(f"{r['name']}: {line}")
    term.ok(f"report: {run['report']['html']}")
