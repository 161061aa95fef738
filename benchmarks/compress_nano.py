"""Compression on the nano model: size, k/v output fidelity and image alignment for several ranks.

Trains one concept on the shipped nano model (k/v, regularised, the demo's settings), then stores it at
several ranks / energies with `cdiff compress`'s functions and scores each with the nano CLIP: image
alignment to the training images (the same seeds for every row, so rows differ only by the weights) and
the largest change of a k/v layer's output on 256 ordinary captions. Also prints the sizes the same
ranks would give for Stable Diffusion 1.x's 32 k/v layers (full: 76.7 MB in fp32).

    python benchmarks/compress_nano.py [--concept tealstar] [--steps 250]

Writes benchmarks/results/compress_nano.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PROMPTS = ("a small {} on the left, on a gray background", "a big {} at the top, on a black background",
           "{} on the right of a blue circle, on a white background", "a small {} at the bottom, on a green background")
SETTINGS = (("full (uncompressed)", None, None), ("energy 0.999", None, 0.999), ("energy 0.99", None, 0.99),
            ("energy 0.9", None, 0.9), ("rank 8", 8, None), ("rank 4", 4, None), ("rank 2", 2, None), ("rank 1", 1, None))
# Stable Diffusion 1.x: (out features, count) of its cross-attention k/v layers; every input is 768 wide.
SD15_KV = ((320, 2 * 5), (640, 2 * 5), (1280, 2 * 6))


def sd15_bytes(rank: int | None) -> int:
    """fp16 factors of rank r for SD 1.x's 32 k/v layers (None: the full fp32 weights cdiff stores)."""
    if rank is None:
        return sum(out * 768 * n * 4 for out, n in SD15_KV)
    return sum(min(rank, out, 768) * (out + 768) * n * 2 for out, n in SD15_KV)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concept", default="tealstar")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "compress_nano.json")
    args = ap.parse_args()

    import torch
    from PIL import Image

    from cdiff_cli import world
    from cdiff_cli.compression import compress_delta, output_fidelity, ranks, stored_bytes
    from cdiff_cli.core.delta import apply_delta
    from cdiff_cli.core.layers import fingerprint
    from cdiff_cli.evaluation import metrics as M
    from cdiff_cli.evaluation.features import load_clip
    from cdiff_cli.generation import sample, set_scheduler
    from cdiff_cli.merging import prompt_features
    from cdiff_cli.merging.captions import load_captions
    from cdiff_cli.models.base import load_pipeline
    from cdiff_cli.training import Concept, TrainConfig, train
    from cdiff_cli.training.images import list_images
    from cdiff_cli.training.regularisation import generated_regularisation

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="cdiff-compress-"))
    clip = load_clip("nano")
    folder = work / args.concept
    world.save_concept_images(args.concept, folder, n=6, seed=0)
    images = list_images(folder)
    train_feats = clip.images([Image.open(p.path).convert("RGB") for p in images])
    cls = world.CONCEPTS[args.concept].class_word
    token = f"<{args.concept}>"

    base = load_pipeline("nano")
    reg = generated_regularisation(base, class_word=cls, count=16, seed=0, resolution=64,
                                   fingerprint=fingerprint(base.unet), cache_root=work / "reg")
    W0 = {n: p.detach().clone() for n, p in base.unet.named_parameters()}
    X = torch.cat(prompt_features(base, list(load_captions())[:256]))
    pipe = load_pipeline("nano")
    cfg = TrainConfig(steps=args.steps, batch_size=4, lr=args.lr, scale_lr=False, resolution=64, seed=0, precision="fp32",
                      aug=False)  # the demo's settings (cdiff_cli/world/demo.py)
    delta = train(pipe, [Concept(token, cls, images, reg)], cfg).delta
    prompts = [t.format(f"{token} {cls}") for t in PROMPTS]

    def alignment(d):
        p = load_pipeline("nano")
        apply_delta(p, d)
        set_scheduler(p, "dpm")
        imgs = [im for k, pr in enumerate(prompts) for im in sample(p, pr, n=args.images_per_prompt, steps=20, seed=100 * k)]
        return float(M.mean_cosine(clip.images(imgs), train_feats))

    base_w = {n: W0[n] for n in delta.weights}
    rows = []
    for label, rank, energy in SETTINGS:
        if rank is None and energy is None:
            d, size, r, fid = delta, delta.num_bytes(), None, {"max_output_diff": 0.0, "max_relative_output_diff": 0.0}
        else:
            low = compress_delta(delta, base_w, rank=rank, energy=energy)
            d, size, r = low.expanded(base_w), stored_bytes(low), ranks(low)
            fid = output_fidelity(delta, d, X)
        row = {"setting": label, "rank": rank, "energy": energy, "bytes": size,
               "ranks": [min(r), max(r)] if r else None, **fid, "image_alignment": alignment(d),
               "sd15_bytes": sd15_bytes(rank) if rank else (sd15_bytes(None) if energy is None else None)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    print(f"\nCompression of <{args.concept}> (nano, {args.steps} steps; image alignment on "
          f"{len(PROMPTS)} prompts x {args.images_per_prompt} images, same seeds)\n")
    print("| setting | ranks kept | size (nano) | largest k/v output change on captions | image alignment | SD 1.x size at this rank |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        ranks_ = "full" if r["ranks"] is None else (f"{r['ranks'][0]}" if r["ranks"][0] == r["ranks"][1] else f"{r['ranks'][0]}-{r['ranks'][1]}")
        sd = f"{r['sd15_bytes'] / 1e6:.1f} MB" if r["sd15_bytes"] else "depends on the update"
        print(f"| {r['setting']} | {ranks_} | {r['bytes'] / 1e3:.0f} kB | {100 * r['max_relative_output_diff']:.2f} % "
              f"| {r['image_alignment']:.3f} | {sd} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "torch": torch.__version__, "concept": args.concept, "steps": args.steps,
            "lr": args.lr, "images_per_prompt": args.images_per_prompt, "prompts": PROMPTS}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
