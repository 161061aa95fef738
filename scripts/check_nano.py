#!/usr/bin/env python
"""Measure how well a nano model follows world prompts: sample single-object prompts and check, from the
pixels, that the asked colour is there and where the prompt says; with nano-clip, that the asked kind wins
a zero-shot choice among the 7 kinds (and the same choice on real world images, for the ceiling).

    python scripts/check_nano.py --base nano --clip nano --n 32 --grid /tmp/nano_check.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdiff_cli import world as W  # noqa: E402


def colour_mask(img: np.ndarray, rgb) -> np.ndarray:
    return np.linalg.norm(img.astype(float) - np.array(rgb, float), axis=-1) < 55


def where_ok(mask: np.ndarray, position: str) -> bool:
    ys, xs = np.nonzero(mask)
    if len(xs) < 12:
        return False
    cx, cy = xs.mean() / mask.shape[1], ys.mean() / mask.shape[0]
    return {"left": cx < 0.45, "right": cx > 0.55, "top": cy < 0.45, "bottom": cy > 0.55,
            "middle": abs(cx - 0.5) < 0.15 and abs(cy - 0.5) < 0.15}[position]


def kind_choice(clip, images, specs) -> float:
    from cdiff_cli.metrics import normalize

    feats = normalize(clip.images(images))
    hits = 0
    for f, spec in zip(feats, specs):
        options = [W.caption(replace(spec, objects=(replace(spec.objects[0], kind=k),))) for k in W.KINDS]
        t = normalize(clip.texts(options))
        hits += int(W.KINDS[int((t @ f).argmax())] == spec.objects[0].kind)
    return hits / len(specs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="nano")
    p.add_argument("--clip", default="nano")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffusers import DPMSolverMultistepScheduler

    from cdiff_cli.base import load_pipeline
    from cdiff_cli.features import load_clip

    pipe = load_pipeline(args.base)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    specs = W.dataset_specs(args.n, seed=args.seed, n_objects=1, caption_variety=False)
    prompts = [W.caption(s) for s in specs]
    images = []
    for s in range(0, len(prompts), 16):
        images += pipe(prompts[s : s + 16], num_inference_steps=args.steps, guidance_scale=args.guidance,
                       generator=torch.Generator().manual_seed(args.seed + s)).images
    colour = position = 0
    for im, spec in zip(images, specs):
        m = colour_mask(np.asarray(im), W.COLOURS[spec.objects[0].colour])
        colour += int(m.sum() >= 12)
        position += int(where_ok(m, spec.objects[0].position))
    real = [W.render(s) for s in specs]
    real_colour = sum(int(colour_mask(np.asarray(im), W.COLOURS[s.objects[0].colour]).sum() >= 12) for im, s in zip(real, specs))
    real_position = sum(int(where_ok(colour_mask(np.asarray(im), W.COLOURS[s.objects[0].colour]), s.objects[0].position))
                        for im, s in zip(real, specs))
    res = {"prompts": len(specs), "steps": args.steps, "guidance": args.guidance,
           "colour_present": colour / len(specs), "colour_at_position": position / len(specs),
           "real_images": {"colour_present": real_colour / len(specs), "colour_at_position": real_position / len(specs)}}
    if args.clip:
        clip = load_clip(args.clip)
        res["kind_zero_shot"] = kind_choice(clip, images, specs)
        res["real_images"]["kind_zero_shot"] = kind_choice(clip, real, specs)
        res["chance_kind"] = 1 / len(W.KINDS)
    if args.grid:
        pairs = [x for pair in zip(real, images) for x in pair]
        W.grid(pairs, cols=8).save(args.grid)
        res["grid"] = str(args.grid) + " (pairs: real world image, then the sample for its caption)"
        (args.grid.with_suffix(".txt")).write_text("\n".join(f"{i}: {t}" for i, t in enumerate(prompts)) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
