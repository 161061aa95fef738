"""cdiff gen: sample images; concept tokens in the prompt are resolved from the registry."""

from __future__ import annotations

import math
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from cdiff_cli.cli._app import command
from cdiff_cli.cli._options import Base, Device, Json, Precision, registry
from cdiff_cli.cli._term import term
from cdiff_cli.defaults import GEN, LIMITS, SCHEDULERS

Scheduler = Enum("Scheduler", {name.replace("-", "_"): name for name in SCHEDULERS}, type=str)


@command("gen", loads_models=True)
def gen_cmd(
    prompt: Annotated[str, typer.Argument(help='Prompt, e.g. "<mycat> cat on <mychair> chair".')],
    n: Annotated[int, typer.Option("-n", "--num", min=1, max=LIMITS.images, help="Number of images.")] = GEN.n,
    steps: Annotated[int, typer.Option(min=1, max=LIMITS.sample_steps, help="Sampling steps.")] = GEN.steps,
    guidance: Annotated[Optional[float], typer.Option(min=0.0, max=LIMITS.guidance, help="Classifier-free guidance scale. Default: the base's own, 3 for the nano model (it follows its prompts best there), else 6.", show_default=False)] = GEN.guidance,
    seed: Annotated[int, typer.Option(min=0, max=LIMITS.seed, help="Seed of the first image; image i uses seed + i.")] = GEN.seed,
    height: Annotated[Optional[int], typer.Option(min=8, max=LIMITS.resolution, help="Image height (default: the base's native size).", show_default=False)] = None,
    width: Annotated[Optional[int], typer.Option(min=8, max=LIMITS.resolution, help="Image width (default: the base's native size).", show_default=False)] = None,
    negative: Annotated[Optional[str], typer.Option(help="Negative prompt.", show_default=False)] = None,
    scheduler: Annotated[Scheduler, typer.Option(help="Sampler (default: DPM-Solver++ multistep).")] = Scheduler(GEN.scheduler),
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")] = Path("cdiff-out"),
    concept: Annotated[Optional[list[str]], typer.Option("--concept", "-c", help="Use these entries (e.g. a merged one) instead of resolving tokens.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=LIMITS.gen_batch_size, help="Images per pipeline call.")] = GEN.batch_size,
    base: Base = None,
    precision: Annotated[Precision, typer.Option(help="Weights precision. fp16 on a GPU by default; a CPU uses fp32 (bf16 if asked).")] = Precision(GEN.precision),
    low_memory: Annotated[bool, typer.Option("--low-memory", help="Small GPU: the base waits in CPU memory and diffusers' model CPU offload brings one model at a time (text encoder, UNet, VAE) to the GPU; images are decoded one at a time. A little slower.")] = False,
    offload: Annotated[bool, typer.Option("--offload", help="Smaller GPU still: diffusers' sequential CPU offload, one layer at a time on the GPU. Much slower.")] = False,
    device: Device = GEN.device,
    as_json: Json = False,
):
    """Generate images. Several concepts in one prompt are merged on the fly (closed form, cached); an explicit `cdiff merge` of exactly the prompt's concepts (for one concept, its constrained entry) is used instead."""
    from cdiff_cli.core.tokens import tokens_past_limit
    from cdiff_cli.errors import CdiffError
    from cdiff_cli.generation import base_guidance, prepare_pipeline, resolve_prompt, sample, save_pngs, set_scheduler

    if n < 1 or steps < 1:
        raise CdiffError("-n and --steps must be at least 1")
    if guidance is not None and not math.isfinite(guidance):
        raise CdiffError(f"--guidance must be a finite number, not {guidance}")
    reg = registry()
    reg.check_outside(out)  # before any model loads
    entries = resolve_prompt(reg, prompt, concept)
    t0 = time.perf_counter()
    spec, pipe, _ = prepare_pipeline(reg, entries, base=base, device=device, precision=precision.value,
                                     offload="sequential" if offload else "model" if low_memory else None,
                                     progress=term.progress())
    if lost := tokens_past_limit(pipe.tokenizer, prompt, [t for e in entries for t in e.tokens]):
        term.warn(f"the prompt is longer than the text encoder's {pipe.tokenizer.model_max_length} tokens: "
                  f"{', '.join(lost)} falls past the limit and is ignored; shorten the prompt or move it forward")
    guidance = base_guidance(spec.ref) if guidance is None else guidance
    scheduler = scheduler.value
    set_scheduler(pipe, scheduler)
    params = {"steps": steps, "guidance": guidance, "seed": seed, "height": height, "width": width,
              "negative": negative, "scheduler": scheduler, "base": spec.ref,
              "concepts": [e.name for e in entries], "tokens": [t for e in entries for t in e.tokens]}
    with term.progress().task("generating", n) as bar:
        images = sample(pipe, prompt, n=n, steps=steps, guidance=guidance, seed=seed, height=height, width=width,
                        negative=negative, batch_size=batch_size, on_image=bar.advance)
    paths = save_pngs(images, out, prompt, params)
    if as_json:
        term.json({"prompt": prompt, "concepts": params["concepts"], "images": [str(p) for p in paths],
                   "seconds": round(time.perf_counter() - t0, 2)})
    else:
        for p in paths:
            term.data(str(p))
