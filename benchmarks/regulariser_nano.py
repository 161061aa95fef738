"""Which ordinary captions should regularise the closed-form merge on the nano world: paired on the same deltas.

For each seed it trains the demo's two concepts alone (k/v, generated regularisation, the demo's settings),
then merges them with the ordinary captions' Gram matrix from the world's own captions (what cdiff uses on a
world base; also at larger ridges) and from the shipped English captions (what it used before), and scores
each merged entry: both concepts present in the 12 pair-prompt images, and the drop in prompt following on
the 48 ordinary-caption images against the base (same seeds).

    python benchmarks/regulariser_nano.py [--seeds 0,1,2,3,4]

Prints a Markdown table (mean ± 95 % t-interval across seeds) and writes
benchmarks/results/regulariser_nano.json. About 4 minutes per seed on one CPU thread.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import quality_nano as Q  # noqa: E402

VARIANTS = (("the world's captions", "world", 1e-3), ("the world's captions, ridge 0.01", "world", 1e-2),
            ("the world's captions, ridge 0.1", "world", 1e-1), ("the shipped English captions", "shipped", 1e-3))


def main(argv: list[str] | None = None) -> None:
    import torch

    from cdiff_cli.core.delta import apply_delta
    from cdiff_cli.merging import gram, merge_deltas, prompt_features
    from cdiff_cli.merging.captions import load_captions
    from cdiff_cli.training import Concept, TrainConfig, train

    argv = list(sys.argv[1:] if argv is None else argv)
    out = HERE / "results" / "regulariser_nano.json"
    a = Q.parse_args(["--methods", "kv", "--reg", "yes", "--ordinary-images", "4", "--seeds", "0,1,2,3,4",
                      "--out", str(out)] + argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    b = Q.Bench(a)
    grams = {"world": b.gram(), "shipped": gram(prompt_features(b.fresh(), list(load_captions())))}
    names = list(b.concepts)[:2]
    rows = []
    for seed in b.seeds:
        deltas = []
        for n in names:
            c = b.concepts[n]
            cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, scale_lr=False, mode="kv",
                              resolution=64, seed=seed, precision=a.precision, aug=False)
            deltas.append(train(b.fresh(), [Concept(c["token"], c["class"], c["images"], b.reg[c["class"]])], cfg).delta)
        for label, captions, ridge in VARIANTS:
            pipe = b.fresh()
            merged, _ = merge_deltas(pipe, deltas, [[b.concepts[n]["class"]] for n in names], G=grams[captions], ridge=ridge)
            apply_delta(pipe, merged)
            row = {"regulariser": label, "ridge": ridge, **Q.pair_row(b, pipe, names[0], names[1], seed, "closed-form merge")}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    lines = ["| regulariser of the merge | both present % | ordinary captions: drop (points) |", "|---|---:|---:|"]
    for (label,), rs in Q._group(rows, "regulariser").items():
        lines.append(f"| {label} | {Q.fmt([r['both'] for r in rs])} | {Q.fmt([r['ordinary_drop_points'] / 100 for r in rs])} |")
    print("\n".join(lines))
    meta = {"machine": platform.platform(), "torch": torch.__version__, **{k: str(v) for k, v in vars(a).items()},
            "seconds": round(time.perf_counter() - t0, 1)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows, "table": lines}, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
