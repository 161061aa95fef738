"""The oracle's ceiling on nano: what a perfect generator would score on the demo's concept prompts.

For each concept prompt (the single-concept prompts of each demo concept, and the pair prompts), the world draws
scenes that show exactly what the prompt asks (`oracle.scenes_for`); each is read by the oracle as rendered and
after the nano VAE's round trip (encode, decode: every generated image passes through the decoder). The share read
as present after the round trip is the most any trained concept can score through this VAE and this oracle.

    python benchmarks/ceiling_nano.py [--per-prompt 40] [--seed 2026]

About three minutes on one CPU thread. Prints a Markdown table per prompt and writes
benchmarks/results/ceiling_nano.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

GROUPS = (("pinksquare",), ("browncircle",), ("pinksquare", "browncircle"))


def round_trip(pipe, image):
    """The image after the VAE's encode and decode (the posterior's mean), as the pipeline post-processes it."""
    import torch

    x = pipe.image_processor.preprocess(image).to(pipe.vae.dtype)
    with torch.no_grad():
        y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    return pipe.image_processor.postprocess(y, output_type="pil")[0]


def measure(pipe, names: tuple[str, ...], per_prompt: int, seed: int) -> list[dict]:
    """Per prompt of the concepts `names`: how many of `per_prompt` world scenes are read with every concept
    present (and with the prompt's other attributes), as rendered and after the round trip."""
    from cdiff_cli.world import oracle as O
    from cdiff_cli.world import scenes as W
    from cdiff_cli.world import scores as S
    from cdiff_cli.world.pictures import render

    looks = {f"<{n}>": O.Look.of(W.CONCEPTS[n]) for n in names}
    prompts = S.concept_prompts([f"<{n}> {W.CONCEPTS[n].kind}" for n in names], list(looks.values()))
    rows = []
    for k, prompt in enumerate(prompts):
        want = O.parse_prompt(prompt, looks)
        counts = {"rendered": [0, 0], "round trip": [0, 0]}
        for spec in O.scenes_for(want, names, per_prompt, seed=seed + k):
            image = render(spec)
            for label, picture in (("rendered", image), ("round trip", round_trip(pipe, image))):
                reading = O.read(picture)
                counts[label][0] += all(O.concept_present(reading, lk) for lk in looks.values())
                scores = O.score_sample(reading, want)
                counts[label][1] += all(v for a, v in scores.items() if a in S.OTHERS)
        rows.append({"concepts": "+".join(names), "prompt": prompt, "n": per_prompt,
                     "present_rendered": counts["rendered"][0], "others_rendered": counts["rendered"][1],
                     "present_round_trip": counts["round trip"][0], "others_round_trip": counts["round trip"][1]})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| concepts | prompt | present, rendered | present, after the VAE | others, after the VAE |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['concepts']} | {r['prompt']} | {r['present_rendered']}/{r['n']} | "
                     f"{r['present_round_trip']}/{r['n']} | {r['others_round_trip']}/{r['n']} |")
    for names in GROUPS:
        g = [r for r in rows if r["concepts"] == "+".join(names)]
        n = sum(r["n"] for r in g)
        share = {k: sum(r[k] for r in g) / n for k in ("present_rendered", "present_round_trip", "others_round_trip")}
        cell = {k: f"{100 * p:.1f} ± {100 * 1.96 * math.sqrt(p * (1 - p) / n):.1f} %" for k, p in share.items()}
        lines.append(f"| **{'+'.join(names)}** | all {n} (± 95 % binomial) | {cell['present_rendered']} | "
                     f"**{cell['present_round_trip']}** | {cell['others_round_trip']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from cdiff_cli.models.base import load_pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-prompt", type=int, default=40, help="world scenes per prompt")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--base", default="nano", help="the shipped nano model, or a folder")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "ceiling_nano.json")
    a = ap.parse_args(argv)
    pipe = load_pipeline(a.base)
    rows = [r for names in GROUPS for r in measure(pipe, names, a.per_prompt, a.seed)]
    print(table(rows))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"meta": {k: str(v) for k, v in vars(a).items()}, "rows": rows}, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
