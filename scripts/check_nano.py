#!/usr/bin/env python
"""How well a nano model draws what its captions say, read by the world's oracle (cdiff_cli/world/oracle.py).

Held-out world captions that state every attribute (seeds the training data never used), one and two
objects; each caption sampled --n times at the demo's settings (DPM-Solver, 20 steps, guidance 6). Prints the
share of samples read right per attribute, with a 95 % Wilson interval, and writes them as JSON.

    python scripts/check_nano.py --base nano --captions 100 --n 2 --grid /tmp/nano_check.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HELD_OUT_SEED = 31337  # train_nano.py renders its data from --seed 0


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of k successes in n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def check(pipe, captions: list[str], n: int, steps: int, guidance: float, seed: int):
    """(Tally over all samples, the images) of `captions`, n images each."""
    from cdiff_cli.generation import sample
    from cdiff_cli.world import oracle as O

    t = O.Tally()
    images = []
    for i, text in enumerate(captions):
        want = O.parse_prompt(text)
        for im in sample(pipe, text, n=n, steps=steps, guidance=guidance, seed=seed + 10 * i):
            t.add(O.score_sample(O.read(im), want))
            images.append(im)
    return t, images


def main(argv=None) -> dict:
    from cdiff_cli import world as W
    from cdiff_cli.generation import set_scheduler
    from cdiff_cli.models.base import load_pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="nano")
    ap.add_argument("--captions", type=int, default=100, help="held-out captions of each kind (one object, two)")
    ap.add_argument("--n", type=int, default=2, help="samples per caption")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=6.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", type=Path, default=None, help="also save the first 32 samples of each kind as a grid")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "nano_base.json")
    args = ap.parse_args(argv)

    import torch

    torch.manual_seed(0)
    pipe = load_pipeline(args.base)
    set_scheduler(pipe, "dpm")
    result = {"base": args.base, "captions": args.captions, "n": args.n, "steps": args.steps, "guidance": args.guidance}
    t0 = time.perf_counter()
    grids = []
    for label, objects, seed in (("one object", 1, HELD_OUT_SEED), ("two objects", 2, HELD_OUT_SEED + 1)):
        specs = W.dataset_specs(args.captions, seed=seed, n_objects=objects, caption_variety=False)
        tally, images = check(pipe, [W.caption(s) for s in specs], args.n, args.steps, args.guidance, args.seed)
        rows = {}
        print(f"\n{label}: {len(specs)} held-out captions x {args.n} samples")
        for key in ("kind", "colour", "fill", "size", "position", "relation", "background", "count", "object"):
            if key in tally.total:
                k, n = tally.right.get(key, 0), tally.total[key]
                lo, hi = wilson(k, n)
                rows[key] = {"k": k, "n": n, "share": k / n, "interval95": [lo, hi]}
                print(f"  {key:10s} {100 * k / n:5.1f} %  [{100 * lo:4.1f}, {100 * hi:4.1f}]  ({k}/{n})")
        result[label] = rows
        grids.append(W.grid(images[:32], cols=8))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} ({result['seconds']} s)")
    if args.grid:
        for g, name in zip(grids, ("one", "two")):
            g.save(args.grid.with_name(f"{args.grid.stem}-{name}{args.grid.suffix}"))
    return result


if __name__ == "__main__":
    main()
