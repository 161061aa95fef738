#!/usr/bin/env python
"""Two diagnostics of a nano base that explain what it cannot follow, read by the world's oracle.

1. Does the starting noise decide the background? Held-out one-object captions are sampled three ways:
   from plain Gaussian noise, from the same noise with its per-channel mean removed, and from noise whose
   mean is that of the caption's own rendered scene at the first sampling step's noise level. If the
   background is read right far more often with the scene's mean than from plain noise, the schedule
   leaks the image into its noisiest training latents and the model learned to take the background from
   the noise rather than from the caption.
2. Do the text encoder's hidden states tell the words of a factor apart? For captions that differ in one
   word (kind, position, background), the cosine similarity of the states at that word. Near 1 means the
   UNet cannot tell "left" from "right" whatever it learns.

    python scripts/diagnose_nano.py --base nano --captions 40
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FACTORS = {
    "kind": ("a big red {} on the left, on a gray background", ("circle", "square", "triangle", "star", "heart", "cross")),
    "position": ("a big red circle {}, on a gray background",
                 ("on the left", "on the right", "at the top", "at the bottom", "in the middle")),
    "background": ("a big red circle on the left, on a {} background", ("gray", "white", "black", "blue", "green")),
}


def word_similarity(pipe) -> dict[str, float]:
    """Per factor: the largest cosine similarity, over pairs of its words, between the text encoder's states
    at the first token where the two captions differ."""
    import torch

    tok, te = pipe.tokenizer, pipe.text_encoder

    def states(text):
        ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            return te(ids)[0][0], ids[0]

    result = {}
    for factor, (template, words) in FACTORS.items():
        encoded = [states(template.format(w)) for w in words]
        worst = -1.0
        for i in range(len(words)):
            for j in range(i + 1, len(words)):
                (a, ia), (b, ib) = encoded[i], encoded[j]
                at = int((ia != ib).nonzero()[0])
                worst = max(worst, float(torch.nn.functional.cosine_similarity(a[at], b[at], dim=0)))
        result[factor] = round(worst, 4)
    return result


def noise_leak(pipe, captions: int, steps: int, guidance: float) -> dict[str, dict[str, float]]:
    """Share of samples whose background (and kind, position) the oracle reads right, per way of starting."""
    import numpy as np
    import torch

    from cdiff_cli import world as W
    from cdiff_cli.world import oracle as O

    sched = pipe.scheduler
    sched.set_timesteps(steps)
    abar = float(sched.alphas_cumprod[int(sched.timesteps[0])])
    shape = (2, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    tallies = {"plain noise": O.Tally(), "zero-mean noise": O.Tally(), "noise with the scene's mean": O.Tally()}
    for i, spec in enumerate(W.dataset_specs(captions, seed=31337, n_objects=1, caption_variety=False)):
        text = W.caption(spec)
        want = O.parse_prompt(text)
        x = torch.from_numpy(np.asarray(W.render(spec), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        with torch.no_grad():
            mean = (pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor).mean((2, 3), keepdim=True)
        eps = torch.randn(shape, generator=torch.Generator().manual_seed(i))
        centred = eps - eps.mean((2, 3), keepdim=True)
        starts = {"plain noise": eps, "zero-mean noise": centred,
                  "noise with the scene's mean": abar**0.5 * mean + (1 - abar) ** 0.5 * centred}
        for name, latents in starts.items():
            images = pipe(text, num_inference_steps=steps, guidance_scale=guidance, latents=latents * sched.init_noise_sigma,
                          num_images_per_prompt=2).images
            for im in images:
                tallies[name].add(O.score_sample(O.read(im), want))
    return {name: {k: t.right.get(k, 0) / t.total[k] for k in ("background", "kind", "position") if k in t.total}
            for name, t in tallies.items()} | {"first step noise level (alpha_bar)": abar}


def main(argv=None) -> dict:
    from cdiff_cli.generation import set_scheduler
    from cdiff_cli.models.base import load_pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="nano")
    ap.add_argument("--captions", type=int, default=40)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=6.0)
    ap.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    args = ap.parse_args(argv)

    import torch

    torch.manual_seed(0)
    pipe = load_pipeline(args.base)
    set_scheduler(pipe, "dpm")
    pipe.set_progress_bar_config(disable=True)
    result = {"base": args.base, "word similarity": word_similarity(pipe),
              "starting noise": noise_leak(pipe, args.captions, args.steps, args.guidance)}
    print("largest cosine similarity of the text encoder's states at the word that differs:")
    for factor, value in result["word similarity"].items():
        print(f"  {factor:10s} {value:.3f}")
    print(f"share read right over {args.captions} captions x 2 samples, by how sampling starts:")
    for name, shares in result["starting noise"].items():
        if isinstance(shares, dict):
            print(f"  {name:28s} " + "  ".join(f"{k} {100 * v:3.0f} %" for k, v in shares.items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
