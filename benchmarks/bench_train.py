"""Training speed and memory: cdiff's trainer against the diffusers example's approach, same run.

Both train the full-size SD 1.x architecture (random weights, built from configs) on the same images
with the same resolution, batch, steps and precision. Each trainer runs in its own process so peak
memory (GPU memory, or process RSS on CPU) is its own.

The baseline follows diffusers' examples/custom_diffusion/train_custom_diffusion.py: Custom Diffusion
attention processors holding separate trainable k/v copies, the whole token-embedding table trainable
with the other rows' gradients zeroed, VAE encoding and text encoding of every image on every step.

    python benchmarks/bench_train.py                      # CPU: 256 px, batch 2, a few steps
    python benchmarks/bench_train.py --device cuda --resolution 512 --batch-size 8 --steps 250
    # --low-memory on an emulated 8 GB GPU: the process may use only 7 GiB (the rest is the CUDA context)
    python benchmarks/bench_train.py --device cuda --resolution 512 --batch-size 2 --steps 30 \
        --precision bf16 --low-memory --memory-cap-gb 7 --out benchmarks/results/bench_train-cuda-lowmem.json
    # --offload as well, cdiff only, capped at 2 GiB (traced: 0.57 GiB of tensors)
    python benchmarks/bench_train.py --device cuda --resolution 512 --batch-size 2 --steps 30 --precision bf16 \
        --low-memory --offload --trainers cdiff --memory-cap-gb 2 --out benchmarks/results/bench_train-cuda-offload.json

A run that does not fit (an out-of-memory under the cap) is recorded as such, not as a failure.

Prints a table and writes JSON (default benchmarks/results/bench_train-<device>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


# -- workers ---------------------------------------------------------------------------------------


def _setup(args, trainer: str):
    """The run up to its first step: the base loaded as each trainer loads it, and the images. Memory is
    followed from here on, phase by phase (`PhasePeaks`)."""
    import torch
    from _sd15 import PhasePeaks, write_images

    os.environ["HF_HUB_OFFLINE"] = "1"
    device = torch.device(args.device)
    if args.memory_cap_gb and device.type == "cuda":
        # Emulates a smaller GPU: the caching allocator refuses to grow past the cap.
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb * 2**30 / total), device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    phases = PhasePeaks(device)
    phases.phase("load")
    t0 = time.perf_counter()
    if trainer == "cdiff":  # as `cdiff train` loads a base: frozen weights in the run's precision
        from cdiff_cli.models.base import load_pipeline

        pipe = load_pipeline(str(args.model_dir), dtype=dtype)
    else:  # as the diffusers example loads it: each model in fp32; the frozen ones are cast on the device later
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(args.model_dir), safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    phases.phase("images")
    work = Path(tempfile.mkdtemp(prefix="cdiff-bench-"))
    targets = write_images(work / "target", 5, seed=1)
    regs = write_images(work / "reg", 10, seed=2)
    return torch, device, dtype, pipe, targets, regs, load_s, phases


def worker_cdiff(args) -> dict:
    torch, device, dtype, pipe, targets, regs, setup_s, phases = _setup(args, "cdiff")
    from _sd15 import PeakMemory

    from cdiff_cli.progress import Progress, Task
    from cdiff_cli.training import Concept, TrainConfig, base_waits_in_cpu_memory, low_memory_config, train
    from cdiff_cli.training.images import ImageItem

    marks: dict[str, list[float]] = {}

    class Clock(Progress):
        def task(self, description, total):
            import contextlib

            @contextlib.contextmanager
            def cm():
                phases.phase({"encoding latents": "cache latents", "training": "train"}.get(description, description))
                marks[description] = [time.perf_counter()]

                class T(Task):
                    def advance(self, n=1, **fields):
                        marks[description].append(time.perf_counter())

                yield T()

            return cm()

    concept = Concept("<bench>", "cat", [ImageItem(p) for p in targets], [ImageItem(p, "photo of a cat") for p in regs])
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, resolution=args.resolution, precision=args.precision,
                      gradient_checkpointing=args.gradient_checkpointing)
    if args.low_memory:
        cfg = low_memory_config(cfg)
    cfg.offload = args.offload
    if not base_waits_in_cpu_memory(cfg, device):  # as `cdiff train` places it
        pipe.to(device)
    t0 = time.perf_counter()
    with PeakMemory(device) as mem:
        train(pipe, [concept], cfg, device=device, progress=Clock(), keep_pipe=False)  # as `cdiff train` calls it
    wall = time.perf_counter() - t0
    steps = marks["training"]
    cache = marks.get("encoding latents", [steps[0], steps[0]])
    return {"load_s": setup_s, "cache_s": cache[-1] - cache[0], "step_times": [b - a for a, b in zip(steps, steps[1:])],
            "train_wall_s": wall, "peak_memory_mb": mem.peak_mb, "reserved_mb": mem.reserved_mb, "memory_before_mb": mem.start_mb,
            "run": phases.finish()}


def worker_baseline(args) -> dict:
    torch, device, dtype, pipe, targets, regs, setup_s, phases = _setup(args, "baseline")
    import random

    import torch.nn.functional as F
    from _sd15 import PeakMemory
    from diffusers import DDPMScheduler
    from diffusers.loaders import AttnProcsLayers
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    from cdiff_cli.training.images import apply_augmentation, latent_mask, open_rgb, sample_augmentation, to_tensor

    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    # The example: add the modifier token, initialise it from a word, train the whole embedding table.
    tok.add_tokens("<bench>")
    new_id = tok.convert_tokens_to_ids("<bench>")
    init_id = tok("cat", add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        te.get_input_embeddings().weight[new_id] = te.get_input_embeddings().weight[init_id]
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_model = getattr(te, "text_model", te)  # transformers 5 flattened CLIPTextModel
    text_model.encoder.requires_grad_(False)
    text_model.final_layer_norm.requires_grad_(False)
    text_model.embeddings.position_embedding.requires_grad_(False)
    # Frozen UNet/VAE in the low precision (the example's weight_dtype); the text encoder stays fp32 because
    # it is trained.
    phases.phase("cast")
    unet.to(device, dtype)
    vae.to(device, dtype)
    te.to(device, torch.float32)
    procs = {}
    st = unet.state_dict()
    for name in unet.attn_processors:
        cross = None if name.endswith("attn1.processor") else unet.config.cross_attention_dim
        if name.startswith("mid_block"):
            hidden = unet.config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = unet.config.block_out_channels[int(name[len("down_blocks.")])]
        layer = name.split(".processor")[0]
        if cross is not None:
            p = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=False, hidden_size=hidden, cross_attention_dim=cross)
            p.load_state_dict({"to_k_custom_diffusion.weight": st[layer + ".to_k.weight"],
                               "to_v_custom_diffusion.weight": st[layer + ".to_v.weight"]})
            procs[name] = p
        else:
            procs[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False)
    del st
    unet.set_attn_processor(procs)
    if args.gradient_checkpointing or args.low_memory:  # the example's --gradient_checkpointing
        unet.enable_gradient_checkpointing()
    layers = AttnProcsLayers(unet.attn_processors).to(device)  # fp32 trainable copies
    lr = 1e-5 * args.batch_size
    opt = torch.optim.AdamW(list(layers.parameters()) + list(te.get_input_embeddings().parameters()), lr=lr, weight_decay=1e-2)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    rng = random.Random(0)
    res, factor = args.resolution, 8
    target_px = [to_tensor(open_rgb(p), res) for p in targets]
    reg_px = [to_tensor(open_rgb(p), res) for p in regs]
    n_target = max(1, args.batch_size // 2)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(device.type, enabled=False)
    phases.phase("train")
    mem = PeakMemory(device).__enter__()  # everything from here on is the training run
    times = [time.perf_counter()]
    t0 = time.perf_counter()
    for _ in range(args.steps):
        imgs, masks, prompts = [], [], []
        for _ in range(n_target):
            a = sample_augmentation(rng, res)
            imgs.append(apply_augmentation(rng.choice(target_px), a))
            masks.append(latent_mask(a, res, factor))
            prompts.append(a.prefix + "photo of a <bench> cat")
        for _ in range(args.batch_size - n_target):
            imgs.append(rng.choice(reg_px))
            prompts.append("photo of a cat")
        with autocast:
            latents = vae.encode(torch.stack(imgs).to(device, dtype)).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (latents.shape[0],), device=device)
            noisy = sched.add_noise(latents, noise, t)
            ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(device)
            enc = te(ids)[0]
            pred = unet(noisy, t, enc.to(dtype)).sample
        mask = torch.stack(masks).to(device)
        mse = (pred[:n_target].float() - noise[:n_target].float()) ** 2
        loss = ((mse * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])).mean()
        loss = loss + F.mse_loss(pred[n_target:].float(), noise[n_target:].float())
        loss.backward()
        grads = te.get_input_embeddings().weight.grad
        keep = torch.arange(len(tok)) != new_id
        grads.data[keep[: grads.shape[0]].nonzero().flatten()] = 0  # only the new token's row may move
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    mem.__exit__(None, None, None)
    return {"load_s": setup_s, "cache_s": 0.0, "step_times": [b - a for a, b in zip(times, times[1:])],
            "train_wall_s": time.perf_counter() - t0, "peak_memory_mb": mem.peak_mb, "reserved_mb": mem.reserved_mb,
            "memory_before_mb": mem.start_mb, "run": phases.finish()}


def loading_s(r: dict) -> float:
    """Seconds until the frozen weights are in the run's precision: the baseline casts after loading."""
    return r["load_s"] + r["run"]["seconds"].get("cast", 0.0)


def ratio(b: dict | None, c: dict | None) -> dict | None:
    """cdiff (c) against the baseline (b): speed and memory ratios."""
    if b is None or c is None or b.get("out_of_memory") or c.get("out_of_memory"):
        return None
    return {"speedup_steps_per_s": b["s_per_step"] / c["s_per_step"], "memory_ratio": c["peak_memory_mb"] / b["peak_memory_mb"],
            "run_memory_ratio": c["run"]["peak_mb"] / b["run"]["peak_mb"], "load_speedup": loading_s(b) / loading_s(c)}


def worker_main(args):
    out = (worker_cdiff if args.worker == "cdiff" else worker_baseline)(args)
    print("RESULT " + json.dumps(out), flush=True)


# -- driver ----------------------------------------------------------------------------------------


def run_worker(args, trainer: str, precision: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", trainer, "--precision", precision, "--device", args.device,
           "--model-dir", str(args.model_dir),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--resolution", str(args.resolution)]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    if args.low_memory:
        cmd.append("--low-memory")
    if args.offload:
        cmd.append("--offload")
    if args.memory_cap_gb:
        cmd += ["--memory-cap-gb", str(args.memory_cap_gb)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode != 0 or not line:
        if "OutOfMemoryError" in r.stderr or "CUDA out of memory" in r.stderr:
            return {"out_of_memory": True, "error": r.stderr.strip().splitlines()[-1][:300]}
        raise SystemExit(f"{trainer}/{precision} failed:\n{r.stderr[-3000:]}")
    res = json.loads(line[-1][7:])
    warm = res["step_times"][1:] or res["step_times"]  # the first step pays one-off kernel setup
    res["s_per_step"] = statistics.median(warm)
    res["wall_250_steps_s"] = res["cache_s"] + res["step_times"][0] + 249 * res["s_per_step"]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["cdiff", "baseline"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--precision", default="fp32,bf16", help="comma list; each is run for both trainers")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--low-memory", action="store_true", help="cdiff with --low-memory; the baseline with its --gradient_checkpointing")
    ap.add_argument("--offload", action="store_true", help="cdiff with --offload (the baseline has no such option: use --trainers cdiff)")
    ap.add_argument("--memory-cap-gb", type=float, default=0.0, help="CUDA: let each process use at most this many GiB")
    ap.add_argument("--trainers", default="baseline,cdiff", help="comma list")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "cdiff-bench-sd15",
                    help="where the random SD 1.x model is saved once (about 4 GB) and loaded from")
    args = ap.parse_args()
    if args.worker:
        return worker_main(args)
    if not (args.model_dir / "model_index.json").is_file():
        from _sd15 import build_sd15

        print(f"building the random SD 1.x model in {args.model_dir} ...", file=sys.stderr, flush=True)
        build_sd15().save_pretrained(str(args.model_dir))

    rows, results = [], {}
    precisions, trainers = args.precision.split(","), args.trainers.split(",")
    for precision in precisions:
        for trainer in trainers:
            print(f"running {trainer} ({precision}) ...", file=sys.stderr, flush=True)
            results[f"{trainer}-{precision}"] = r = run_worker(args, trainer, precision)
            rows.append((trainer, precision, r))

    ratios = {p: ratio(results.get(f"baseline-{p}"), results.get(f"cdiff-{p}")) for p in precisions}
    if "fp32" in precisions and "bf16" in precisions:
        ratios["cdiff-bf16 vs baseline-fp32 (each tool's CPU default)"] = ratio(results.get("baseline-fp32"), results.get("cdiff-bf16"))
    ratios = {k: v for k, v in ratios.items() if v is not None}

    cuda = args.device.startswith("cuda")
    mem = "peak GPU MiB" if cuda else "peak RSS MiB"
    print(f"\nSD 1.x architecture, {args.resolution} px, batch {args.batch_size}, {args.steps} steps, device {args.device}"
          + (", --low-memory" if args.low_memory else "") + (", --offload" if args.offload else "") + (f", capped at {args.memory_cap_gb} GiB" if args.memory_cap_gb else ""))
    print(f"{'trainer':<10}{'precision':<11}{'load s':>8}{'s/step':>8}{'cache s':>9}{mem:>15}{'reserved MiB':>14}{'run peak MiB':>14}"
          f"{'wall s':>9}{'250-step wall s':>17}")
    for trainer, precision, r in rows:
        if r.get("out_of_memory"):
            print(f"{trainer:<10}{precision:<11}  out of memory: {r['error']}")
            continue
        reserved = f"{r['reserved_mb']:.0f}" if r.get("reserved_mb") else "-"
        print(f"{trainer:<10}{precision:<11}{loading_s(r):>8.1f}{r['s_per_step']:>8.2f}{r['cache_s']:>9.1f}{r['peak_memory_mb']:>15.0f}"
              f"{reserved:>14}{r['run']['peak_mb']:>14.0f}{r['train_wall_s']:>9.1f}{r['wall_250_steps_s']:>17.0f}")
    # The peak of each phase of the whole run (from before the base is loaded): the peak a user and the
    # OOM killer see is the largest of them.
    print(f"\npeak {'GPU memory' if cuda else 'RSS'} per phase, MiB (seconds)")
    for trainer, precision, r in rows:
        if not r.get("out_of_memory"):
            cells = "  ".join(f"{k} {v:.0f} ({r['run']['seconds'].get(k, 0):.1f} s)" for k, v in r["run"]["phases"].items())
            print(f"{trainer:<10}{precision:<11}{cells}")
    for k, v in ratios.items():
        print(f"{k}: cdiff {v['speedup_steps_per_s']:.2f}x the baseline's steps/s, {v['load_speedup']:.2f}x its loading speed, "
              f"{v['memory_ratio']:.2f}x its training peak, {v['run_memory_ratio']:.2f}x its whole-run peak")
    meta = {"machine": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "device": args.device, "resolution": args.resolution, "batch_size": args.batch_size, "steps": args.steps,
            "low_memory": args.low_memory, "offload": args.offload, "memory_cap_gb": args.memory_cap_gb}
    try:
        import torch

        meta["torch"] = torch.__version__
        if args.device.startswith("cuda"):
            meta["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    out = args.out or HERE / "results" / f"bench_train-{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results, "ratios": ratios}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
