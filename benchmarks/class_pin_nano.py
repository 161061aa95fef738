"""Pinning the class prompt in the one-concept projection, on nano.

For each seed: train a concept as the demo does (k/v, 600 steps, 64 generated regularisation images), then
score it as trained, constrained as `cdiff merge NAME` does (`merging.constrain_delta`: since 2026-12-05 with the
class prompt softly pinned), and constrained with a hard pin: "photo of a CLASS" added to the constraints with
the base's k/v outputs as targets, on the class prompt's rows that the concept's own prompts do not share
("photo of a" has the same states in both). Scores are `quality_nano.py`'s, with 24 class-prompt images per seed.

    python benchmarks/class_pin_nano.py [--concept browncircle] [--seeds 0,1,2,3,4]

About 4 minutes per seed on one CPU thread. Prints a Markdown table (mean ± 95 % t-interval across seeds) and
writes benchmarks/results/class_pin_nano.json (measured before the soft pin: its "constrained" rows are
unpinned). docs/nano-world.md ("Pinning the class prompt") says why the hard pin is not shipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import quality_nano as Q  # noqa: E402

METHODS = ("as trained", "constrained (cdiff merge NAME)", "constrained, hard pin")


def pinned_delta(b, delta, class_word: str):
    """The one-concept projection with the class prompt's unshared rows held at the base's outputs."""
    import torch

    from cdiff_cli.core.delta import Delta, add_delta_tokens
    from cdiff_cli.core.layers import kv_names
    from cdiff_cli.defaults import DEFAULT_RIDGE
    from cdiff_cli.merging.closed_form import MergeSystem, concept_prompts, prompt_features

    pipe = b.fresh()
    add_delta_tokens(pipe, delta.tokens, delta.embeddings, None)
    own = torch.cat(prompt_features(pipe, concept_prompts(delta.tokens[0], class_word))).double()
    cls = prompt_features(pipe, [f"photo of a {class_word}"])[0].double()
    cls = cls[torch.cdist(cls, own).min(1).values > 1e-3 * cls.norm(dim=1)]
    system = MergeSystem(torch.cat([own, cls]), b.gram(), DEFAULT_RIDGE)
    params = dict(pipe.unet.named_parameters())
    out = {}
    for n, W in delta.weights.items():
        W0 = params[n].detach().float()
        out[n] = system.solve(W0, torch.cat([own @ W.double().T, cls @ W0.double().T])).float() if n in kv_names([n]) else W
    return Delta(out, delta.tokens, delta.embeddings, delta.mode)


def main(argv: list[str] | None = None) -> None:
    from cdiff_cli.core.delta import apply_delta
    from cdiff_cli.merging import constrain_delta
    from cdiff_cli.training import Concept, TrainConfig, train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concept", default="browncircle")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "class_pin_nano.json")
    o = ap.parse_args(argv)
    a = Q.parse_args(["--methods", "kv", "--reg", "yes", "--no-pairs", "--seeds", o.seeds, "--concepts", o.concept,
                      "--ordinary-images", "4", "--class-images", "24"])
    b = Q.Bench(a)
    c = b.concepts[o.concept]
    rows = []
    for seed in b.seeds:
        pipe = b.fresh()
        cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, scale_lr=False, mode="kv", resolution=64,
                          seed=seed, precision=a.precision, aug=False)
        delta = train(pipe, [Concept(c["token"], c["class"], c["images"], b.reg[c["class"]])], cfg).delta
        variants = {METHODS[0]: pipe}
        kept = b.fresh()
        apply_delta(kept, constrain_delta(kept, delta, [c["class"]], G=b.gram()))
        variants[METHODS[1]] = kept
        pinned = b.fresh()
        apply_delta(pinned, pinned_delta(b, delta, c["class"]))
        variants[METHODS[2]] = pinned
        for label, p in variants.items():
            row = {"concept": o.concept, "method": label, "seed": seed,
                   **Q.score_single(b, o.concept, seed, b.images(p, seed, tokens=True, names=[o.concept]))}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    lines = [f"{o.concept}, seeds {o.seeds}, 24 class-prompt images per seed", "",
             "| method | presence % | others % | class prompt: concept % | ordinary captions: drop (points) |",
             "|---|---:|---:|---:|---:|"]
    for label in METHODS:
        rs = [r for r in rows if r["method"] == label]
        m, h = Q.interval([r["ordinary_drop_points"] for r in rs])
        lines.append(f"| {label} | {Q.fmt([r['presence'] for r in rs])} | {Q.fmt([r['others'] for r in rs])} | "
                     f"{Q.fmt([r['class_presence'] for r in rs])} | {m:.0f} ± {h:.0f} |")
    base = [r["baseline_class_presence"] for r in rows if r["method"] == METHODS[0]]
    lines.append(f"| the base | | | {Q.fmt(base)} | |")
    print("\n".join(lines))
    o.out.parent.mkdir(parents=True, exist_ok=True)
    o.out.write_text(json.dumps({"meta": {k: str(v) for k, v in vars(o).items()}, "rows": rows}, indent=2) + "\n")
    print(f"wrote {o.out}")


if __name__ == "__main__":
    main()
