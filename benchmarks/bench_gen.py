"""Generation cost and delta handling at SD 1.x sizes: cdiff gen against the plain diffusers pipeline.

- sampling: the same prompt, seeds, scheduler and steps through a plain StableDiffusionPipeline and
  through cdiff's pipeline with a concept delta written into it (interleaved repeats, median);
- applying a delta (16 k/v layers, 19 M parameters, plus a token) to a loaded base;
- the closed-form merge of two concepts (the Gram matrix of the shipped captions is built once per
  base and cached; its one-off cost is reported separately).

    python benchmarks/bench_gen.py [--resolution 256] [--steps 10] [--repeats 3]
    python benchmarks/bench_gen.py --device cuda --precision fp16 --resolution 512 --steps 25

Uses the random full-size SD 1.x model that bench_train.py saves (built here if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def synthetic_delta(pipe, token: str, seed: int):
    import torch

    from cdiff_cli.core.delta import Delta
    from cdiff_cli.core.layers import read_weights, trainable_names

    g = torch.Generator().manual_seed(seed)
    base = read_weights(pipe.unet, trainable_names(pipe.unet, "kv"))
    weights = {n: w + 0.01 * w.std() * torch.randn(w.shape, generator=g) for n, w in base.items()}
    return Delta(weights, [token], torch.randn(1, pipe.text_encoder.config.hidden_size, generator=g) * 0.01, "kv")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"], help="weights of both pipelines")
    ap.add_argument("--model-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cdiff-bench-sd15")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--parts", default="sampling,merge", help="what to measure; results are merged into an existing JSON")
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"

    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from cdiff_cli.core.delta import apply_delta
    from cdiff_cli.generation import sample, set_scheduler
    from cdiff_cli.merging import gram, merge_deltas, prompt_features
    from cdiff_cli.merging.captions import load_captions
    from cdiff_cli.models.base import load_pipeline

    if not (args.model_dir / "model_index.json").is_file():
        from _sd15 import build_sd15

        print(f"building the random SD 1.x model in {args.model_dir} ...", file=sys.stderr, flush=True)
        build_sd15().save_pretrained(str(args.model_dir))
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]

    parts = set(args.parts.split(","))
    out = args.out or HERE / "results" / f"bench_gen-{args.device.split(':')[0]}.json"
    results = json.loads(out.read_text())["results"] if out.is_file() else {}

    # Plain diffusers pipeline.
    plain = StableDiffusionPipeline.from_pretrained(str(args.model_dir), dtype=dtype, safety_checker=None,
                                                    requires_safety_checker=False).to(device)
    plain.set_progress_bar_config(disable=True)
    plain.scheduler = DPMSolverMultistepScheduler.from_config(plain.scheduler.config)

    # cdiff's pipeline with a concept written into it.
    pipe = load_pipeline(str(args.model_dir), dtype=dtype, device=device)
    d1, d2 = synthetic_delta(pipe, "<c1>", 1), synthetic_delta(pipe, "<c2>", 2)
    t0 = time.perf_counter()
    apply_delta(pipe, d1)
    apply_s = time.perf_counter() - t0
    set_scheduler(pipe, "dpm")

    if "sampling" in parts:
        kw = dict(num_inference_steps=args.steps, guidance_scale=6.0, height=args.resolution, width=args.resolution)
        times = {"plain": [], "cdiff": []}
        for r in range(args.repeats + 1):  # the first round warms both up
            t0 = time.perf_counter()
            plain("photo of a cat", generator=[torch.Generator("cpu").manual_seed(0)], **kw)
            t_plain = time.perf_counter() - t0
            t0 = time.perf_counter()
            sample(pipe, "photo of a <c1> cat", n=1, steps=args.steps, guidance=6.0, seed=0,
                   height=args.resolution, width=args.resolution)
            t_cdiff = time.perf_counter() - t0
            if r:
                times["plain"].append(t_plain)
                times["cdiff"].append(t_cdiff)
        plain_s, cdiff_s = statistics.median(times["plain"]), statistics.median(times["cdiff"])
        results.update(sampling_plain_s=plain_s, sampling_cdiff_s=cdiff_s, sampling_overhead=cdiff_s / plain_s - 1, samples=times)

    # Merge: Gram of the shipped captions (one-off per base, cached), then the two-concept merge.
    results["apply_delta_s"] = apply_s
    if "merge" in parts:
        base = load_pipeline(str(args.model_dir), device="cpu")
        t0 = time.perf_counter()
        G = gram(prompt_features(base, list(load_captions())))
        results["gram_once_per_base_s"] = time.perf_counter() - t0
        merges = []
        for _ in range(3):  # the first call also pages the base's k/v weights in from disk
            t0 = time.perf_counter()
            merge_deltas(base, [d1, d2], [["cat"], ["chair"]], G=G)
            merges.append(time.perf_counter() - t0)
        results["merge_two_first_call_s"] = merges[0]
        results["merge_two_s"] = statistics.median(merges[1:])
    print(f"\nSD 1.x architecture, {args.resolution} px, {args.steps} DPM-Solver steps, device {args.device}")
    print(f"{'what':<42}{'seconds':>10}")
    for label, key in (("sample, plain diffusers pipeline", "sampling_plain_s"), ("sample, cdiff (delta written in)", "sampling_cdiff_s"),
                       ("apply a delta (16 k/v layers + token)", "apply_delta_s"), ("merge two concepts (Gram cached)", "merge_two_s"),
                       ("  the same, first call in the process", "merge_two_first_call_s"),
                       ("Gram of 1,353 captions (once per base)", "gram_once_per_base_s")):
        if key in results:
            print(f"{label:<42}{results[key]:>10.3f}")
    if "sampling_overhead" in results:
        print(f"cdiff sampling vs plain: {100 * results['sampling_overhead']:+.1f} %")
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__, "device": args.device,
            f"threads_{args.parts.replace(',', '_')}": torch.get_num_threads(),
            "resolution": args.resolution, "steps": args.steps, "repeats": args.repeats, "precision": args.precision}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
