"""How many training steps the demo's concepts need: k/v with generated regularisation on the shipped nano
model, at several (steps, lr) settings, several seeds, scored by the oracle.

For each setting and seed it trains each of --concepts alone (the demo's batch, photos and regularisation
set: 64 generated images, or --num-reg), then merges the first two with the closed form. Scores per run:
- presence: share of the images of the new-context prompts (2 per prompt) in which the oracle reads the concept;
- class: share of 8 "photo of a CLASS" images showing the concept (drift);
- both: share of the 12 pair-prompt images of the merged entry showing both concepts.
The ordinary-caption drop is left to quality_nano.py (it needs 48 images per run to resolve 5 points).

    python benchmarks/steps_nano.py [--settings 300:6e-4,600:6e-4,1000:6e-4,300:1.2e-3] [--seeds 0,1,2,3,4] [--num-reg 64]

Prints a Markdown table (mean over seeds with a 95 % t-interval) and writes
benchmarks/results/steps_nano_regN.json (N: --num-reg; --out overrides).
About 8 minutes per setting of 300 steps at five seeds on 2 CPU cores, 12 at 600, 17 at 1000.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import quality_nano as Q  # noqa: E402  (the shared bench: base, photos, regularisation sets, pair scoring)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="300:6e-4,600:6e-4,1000:6e-4,300:1.2e-3", help="STEPS:LR,...")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--concepts", default="pinksquare,browncircle", help="the first two also make the pair")
    ap.add_argument("--num-reg", type=int, default=64, help="generated regularisation images per class (the demo's)")
    ap.add_argument("--out", type=Path, default=None, help="default: results/steps_nano_reg{N}.json")
    return ap.parse_args()


def bench(args) -> Q.Bench:
    """quality_nano's Bench without its base images (this benchmark compares settings, not against the base)."""
    qa = Q.parse_args(["--seeds", args.seeds, "--concepts", args.concepts, "--num-reg", str(args.num_reg)])
    return Q.Bench(qa, base_images=False)


def share(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


def run_setting(b: Q.Bench, steps: int, lr: float, seed: int) -> list[dict]:
    from cdiff_cli.core.delta import apply_delta
    from cdiff_cli.merging import merge_deltas
    from cdiff_cli.training import Concept, TrainConfig, train
    from cdiff_cli.world import oracle as O

    rows, deltas = [], {}
    for name, c in b.concepts.items():
        pipe = b.fresh()
        cfg = TrainConfig(steps=steps, batch_size=b.args.batch_size, lr=lr, scale_lr=False, mode="kv", resolution=64,
                          seed=seed, precision=b.args.precision, aug=False)
        deltas[name] = train(pipe, [Concept(c["token"], c["class"], c["images"], b.reg[c["class"]])], cfg).delta
        seen = [O.concept_present(O.read(im), c["look"])
                for i, (p, _) in enumerate(b.prompts(name)) for im in b.gen(pipe, p, 2, 1000 * seed + 10 * i)]
        drift = [O.concept_present(O.read(im), c["look"])
                 for im in b.gen(pipe, f"photo of a {c['class']}", 8, 1000 * seed + 500)]
        rows.append({"steps": steps, "lr": lr, "seed": seed, "concept": name, "presence": share(seen),
                     "class": share(drift)})
    a, c2 = list(b.concepts)[:2]
    pipe = b.fresh()
    merged, _ = merge_deltas(pipe, [deltas[a], deltas[c2]], [[b.concepts[a]["class"]], [b.concepts[c2]["class"]]],
                             G=b.gram())
    apply_delta(pipe, merged)
    rows.append({"steps": steps, "lr": lr, **Q.pair_row(b, pipe, a, c2, seed, "closed-form merge")})
    return rows


def table(rows: list[dict], settings: list[tuple[int, float]], names: list[str]) -> list[str]:
    head = ["steps", "lr", *(f"{n} presence %" for n in names), *(f"{n} class prompt %" for n in names), "merged: both %"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for steps, lr in settings:
        mine = [r for r in rows if r["steps"] == steps and r["lr"] == lr]
        single = {n: [r for r in mine if r.get("concept") == n] for n in names}
        cells = [str(steps), f"{lr:g}", *(Q.fmt([r["presence"] for r in single[n]]) for n in names),
                 *(Q.fmt([r["class"] for r in single[n]]) for n in names), Q.fmt([r["both"] for r in mine if "both" in r])]
        out.append("| " + " | ".join(cells) + " |")
    return out


def main():
    args = parse_args()
    settings = [(int(s), float(lr)) for s, lr in (x.split(":") for x in args.settings.split(","))]
    b = bench(args)
    rows: list[dict] = []
    t0 = time.perf_counter()
    for steps, lr in settings:
        for seed in b.seeds:
            for row in run_setting(b, steps, lr, seed):
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    lines = table(rows, settings, list(b.concepts))
    print("\n".join(lines))
    # One file per regularisation-set size, so that a run with the defaults keeps the others' results.
    args.out = args.out or HERE / "results" / f"steps_nano_reg{args.num_reg}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": args.settings, "seeds": args.seeds, "concepts": args.concepts,
                                    "num_reg": args.num_reg,
                                    "machine": platform.platform(), "minutes": round((time.perf_counter() - t0) / 60, 1),
                                    "rows": rows, "table": lines}, indent=1) + "\n")


if __name__ == "__main__":
    main()
