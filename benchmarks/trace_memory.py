"""Tensor memory and FLOPs of cdiff's training step on the full SD 1.x UNet, traced without allocating it.

The step runs on fake tensors (`torch._subclasses.FakeTensorMode`: shapes and dtypes, no data), so
a batch of 8 at 512 px, which needs gigabytes, is traced on any machine in about half a minute.
PyTorch's `MemTracker` follows every tensor the step creates and reports the peak: frozen and
trainable weights, saved activations, the backward's temporaries, gradients and AdamW state. The
step is cdiff's own: only the k/v weights trainable (fp32), frozen layers that keep less
(`cdiff_cli.models.frozen_ops`), autocast, gradient checkpointing and one image per pass for `--low-memory`.
In a separate pass, `FlopCounterMode` counts the step's FLOPs, and those of the VAE and text encoding
that the diffusers example repeats on every step.

What it is not: a GPU measurement. It traces the CPU kernels (autocast's CPU casting rules, the CPU
flash-attention kernel, which like CUDA's keeps only its output and log-sum-exp), and counts tensor
bytes, not the CUDA caching allocator's rounding and fragmentation, cuBLAS workspaces or the CUDA
context (about 0.5 GB). `memory.py`'s preflight estimate adds those; this table puts the two side by
side. The text encoder's weights are added by count (its activations for 77 tokens are negligible),
as training holds them: its token table cut to the rows a run's prompts use, and under `--offload`
one encoder layer at a time.

    python benchmarks/trace_memory.py [--check-real] [--out benchmarks/results/trace_memory.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

# (name, resolution, batch, precision, --low-memory, --offload, device the preflight total is for)
CONFIGS = [
    ("CPU benchmark, fp32", 256, 2, "fp32", False, False, "cpu"),
    ("CPU benchmark, bf16", 256, 2, "bf16", False, False, "cpu"),
    ("GPU target: 512 px, batch 8", 512, 8, "bf16", False, False, "cuda"),
    ("--low-memory, 512 px, batch 2", 512, 2, "bf16", True, False, "cuda"),
    ("--low-memory --offload, 512 px, b. 2", 512, 2, "bf16", True, True, "cuda"),
]


@contextlib.contextmanager
def _emulated_transfers():
    """--offload on a CPU trace: accelerate's hook moves each frozen layer's weights between the CPU and
    the device; here "meta" stands for the CPU copy (not counted) and a fresh clone for the device copy
    (counted from its creation to its release, as on the GPU). accelerate's own setter cannot rebuild a
    parameter of fake tensors, hence this stand-in for it."""
    import accelerate.hooks as hooks
    import torch

    def set_tensor(module, name, device, value=None, **kwargs):
        if name in module._buffers:
            return  # buffers stay where they are (offload_buffers=False)
        old = module._parameters[name]
        if torch.device(device).type == "meta":
            new = torch.empty_like(old, device="meta")
        else:
            new = (old if value is None else value).clone()
        module._parameters[name] = torch.nn.Parameter(new, requires_grad=False)

    real = hooks.set_module_tensor_to_device
    hooks.set_module_tensor_to_device = set_tensor
    try:
        yield
    finally:
        hooks.set_module_tensor_to_device = real


def _tracker():
    """PyTorch's MemTracker, minus the hook it puts on every parameter's gradient (frozen ones take none)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    return Tracker()


def _cdiff_step(resolution: int, images: int, precision: str, low_memory: bool, observe, fake: bool = True,
                offload: bool = False):
    """Build the SD 1.x UNet as cdiff trains it and run one forward/backward of `images` images and the
    AdamW step inside the dispatch mode `observe(unet, optimizer)`; returns (mode, unet, trainable).
    `offload`: as `--offload` (gradient checkpointing, frozen weights on the device one layer at a time)."""
    import torch
    from _sd15 import sd15_unet
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cdiff_cli.core.layers import trainable_names
    from cdiff_cli.models import frozen_ops
    from cdiff_cli.models import offload as cdiff_offload

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    with FakeTensorMode() if fake else contextlib.nullcontext():
        unet = sd15_unet()
        for p in unet.parameters():
            p.data = p.data.to(dtype)  # frozen weights in the run's precision, as cdiff loads them
        unet.requires_grad_(False)
        params = dict(unet.named_parameters())
        trainable = [params[n] for n in trainable_names(unet, "kv")]
        for p in trainable:
            p.data = p.data.float()
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        if low_memory or offload:
            unet.enable_gradient_checkpointing()
        unet.train()
        autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        side = resolution // 8
        with contextlib.ExitStack() as stack:
            stack.enter_context(frozen_ops.saving_less(unet))  # entered in this order by train()
            if offload:
                stack.enter_context(_emulated_transfers())
                stack.enter_context(cdiff_offload.frozen_weights_offloaded(unet, "cpu"))
            mode = stack.enter_context(observe(unet, optimizer))
            latents = torch.randn(images, 4, side, side)
            text = torch.randn(images, 77, 768)
            t = torch.randint(0, 1000, (images,))
            with autocast:
                pred = unet(latents.to(dtype), t, text.to(dtype)).sample
            torch.nn.functional.mse_loss(pred.float(), latents).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return mode, unet, trainable


def trace_step(resolution: int, batch: int, precision: str, low_memory: bool, fake: bool = True,
               offload: bool = False) -> dict:
    """Peak tensor bytes of one cdiff training step of the SD 1.x UNet, by kind. `fake=False` runs the
    same trace on real tensors (to check the fake one; needs the memory and the time)."""
    import torch

    def observe(unet, optimizer):
        tracker = _tracker()
        # Under --offload the frozen weights are on "meta" (their CPU copies): not device memory.
        tracker.track_external(*(p for p in unet.parameters() if p.device.type != "meta"), *unet.buffers(), optimizer)
        return tracker

    # --low-memory: one image per pass; later passes only accumulate into the same gradients, so one
    # pass and the optimizer step give the peak.
    images = 1 if low_memory else batch
    tracker, unet, trainable = _cdiff_step(resolution, images, precision, low_memory, observe, fake, offload)
    snap = next(v for k, v in tracker.get_tracker_snapshot("peak").items() if torch.device(k).type == "cpu")
    kinds = {str(k).split(".")[-1].lower(): int(v) for k, v in snap.items()}
    from cdiff_cli.models.offload import resident_params

    unet_params = sum(p.numel() for p in unet.parameters())
    return {"peak_bytes": kinds.pop("total"), "by_kind": kinds, "images_per_pass": images, "offload": offload,
            "trainable_params": sum(p.numel() for p in trainable), "unet_params": unet_params,
            # the UNet parameters the preflight counts on the device
            "device_unet_params": resident_params(unet) if offload else unet_params}


def trace_phases(resolution: int, precision: str, low_memory: bool, offload: bool) -> dict:
    """Peak tensor bytes of the phases before the first step on a GPU, as `cdiff train` runs them: the
    regularisation images (the UNet's steps for a batch with its unconditional twins, and the VAE
    decoding one image at a time) and the latent caching (VAE encoding). Activations are traced on fake
    tensors; the weights on the device are added by count, by where each phase keeps them: all of them
    by default; under --low-memory the base waits in CPU memory and diffusers' model offload brings one
    model at a time (text encoder, UNet or VAE); under --offload its sequential offload one layer."""
    import torch
    from _sd15 import sd15_text_config, sd15_unet, sd15_vae
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import CLIPTextModel

    from cdiff_cli.training import ENCODE_BATCH, ENCODE_BATCH_LOW_MEMORY
    from cdiff_cli.training.regularisation import BATCH, BATCH_LOW_MEMORY

    staged = low_memory or offload
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def activations(fn) -> int:
        tracker = _tracker()
        with tracker, torch.no_grad():
            fn()
        snap = next(v for k, v in tracker.get_tracker_snapshot("peak").items() if torch.device(k).type == "cpu")
        kinds = {str(k).split(".")[-1].lower(): int(v) for k, v in snap.items()}
        return kinds.get("act", 0) + kinds.get("temp", 0)

    with FakeTensorMode():
        unet, vae, te = sd15_unet(), sd15_vae(), CLIPTextModel(sd15_text_config())
        for m in (unet, vae, te):
            m.requires_grad_(False)
            for p in m.parameters():
                p.data = p.data.to(dtype)
        weights = {name: sum(p.numel() * p.element_size() for p in m.parameters())
                   for name, m in (("unet", unet), ("vae", vae), ("text encoder", te))}
        layer = max(sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
                    for m in (*unet.modules(), *vae.modules(), *te.modules()))
        side = resolution // 8
        gen_batch = 2 * (BATCH_LOW_MEMORY if staged else BATCH)  # with the unconditional twins
        enc_batch = ENCODE_BATCH_LOW_MEMORY if staged else ENCODE_BATCH
        unet_act = activations(lambda: unet(torch.randn(gen_batch, 4, side, side, dtype=dtype),
                                            torch.full((gen_batch,), 500), torch.randn(gen_batch, 77, 768, dtype=dtype)))
        decode_act = activations(lambda: vae.decode(torch.randn(1, 4, side, side, dtype=dtype)))
        encode_act = activations(lambda: vae.encode(torch.randn(enc_batch, 3, resolution, resolution, dtype=dtype)))
    everything = sum(weights.values())
    if offload:  # one layer's weights at a time
        generation = layer + max(unet_act, decode_act)
        caching = weights["vae"] + encode_act
    elif low_memory:  # one model at a time
        generation = max(weights["unet"] + unet_act, weights["vae"] + decode_act, weights["text encoder"])
        caching = weights["vae"] + encode_act
    else:
        generation = everything + max(unet_act, decode_act)
        caching = everything + encode_act
    return {"regularisation_images_bytes": generation, "latent_caching_bytes": caching,
            "generation_batch": gen_batch // 2, "encode_batch": enc_batch,
            "unet_inference_activation_bytes": unet_act, "vae_decode_activation_bytes": decode_act,
            "vae_encode_activation_bytes": encode_act, "weight_bytes": weights}


def step_tflop(resolution: int, batch: int, low_memory: bool) -> float:
    """FLOPs of one cdiff step (a separate pass: counting and memory tracing together disturb the
    checkpointed backward). --low-memory repeats its checkpointed pass once per image. FLOPs do not
    depend on the precision: counted in fp32."""
    from torch.utils.flop_counter import FlopCounterMode

    images = 1 if low_memory else batch
    flops, _, _ = _cdiff_step(resolution, images, "fp32", low_memory, lambda unet, opt: FlopCounterMode(display=False))
    return flops.get_total_flops() / 1e12 * (batch // images)


def example_extra_tflop(resolution: int, batch: int) -> float:
    """What the diffusers example computes on every step besides the UNet: the VAE encoding of the
    batch and the text encoding of its prompts (cdiff caches the first and the regularisation half
    of the second). FLOPs do not depend on the precision: counted in fp32."""
    import torch
    from _sd15 import sd15_text_config, sd15_vae
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextModel

    with FakeTensorMode():
        vae, te = sd15_vae(), CLIPTextModel(sd15_text_config())
        flops = FlopCounterMode(display=False)
        with flops, torch.no_grad():
            vae.encode(torch.randn(batch, 3, resolution, resolution))
            te(torch.randint(0, 49408, (batch, 77)))
    return flops.get_total_flops() / 1e12


def text_encoder_params(training: bool = True, offload: bool = False) -> int:
    """The SD 1.x text encoder's parameters; `training`: those on the device during a run (the token
    table cut down; under `offload` one encoder layer at a time)."""
    from _sd15 import sd15_text_config
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import CLIPTextModel

    from cdiff_cli.models.memory import text_params_in_training

    with FakeTensorMode():
        te = CLIPTextModel(sd15_text_config())
        return text_params_in_training(te, offload) if training else sum(p.numel() for p in te.parameters())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "trace_memory.json")
    ap.add_argument("--check-real", action="store_true",
                    help="also trace the 256 px rows on real tensors (a few GB, a minute) and record the difference")
    args = ap.parse_args()
    import torch

    from cdiff_cli.models.memory import estimate_training_memory

    rows = []
    for name, res, batch, precision, low, off, device in CONFIGS:
        te_params = text_encoder_params(offload=off)
        t0 = time.perf_counter()
        r = trace_step(res, batch, precision, low, offload=off)
        r["tflop_per_step"] = step_tflop(res, batch, low)
        bytes_per = 4 if precision == "fp32" else 2
        unet_params = r["unet_params"]
        est = estimate_training_memory(
            frozen_params=r["device_unet_params"] + te_params - r["trainable_params"], frozen_bytes_per_param=bytes_per,
            trainable_params=r["trainable_params"], images_per_pass=r["images_per_pass"], resolution=res,
            unet_params=unet_params, half=precision != "fp32", gradient_checkpointing=low or off, cuda=device == "cuda")
        traced = r["peak_bytes"] + te_params * bytes_per  # + the text encoder's weights
        phases = trace_phases(res, precision, low, off) if device == "cuda" else None
        rows.append({"config": name, "resolution": res, "batch": batch, "precision": precision, "low_memory": low,
                     "offload": off, "device": device,
                     "traced_unet_step": r, "text_encoder_weight_bytes": te_params * bytes_per,
                     "traced_total_bytes": traced, "phases_before_training": phases,
                     "preflight_estimate_bytes": est.total,
                     "preflight_tensor_terms_bytes": est.total - est.overhead,
                     "example_extra_tflop_per_step": example_extra_tflop(res, batch),
                     "trace_seconds": time.perf_counter() - t0})
        if args.check_real and res <= 256:
            real = trace_step(res, batch, precision, low, fake=False)
            rows[-1]["real_tensor_peak_bytes"] = real["peak_bytes"]
            print(f"{name}: fake {r['peak_bytes']:,} bytes, real {real['peak_bytes']:,} bytes")
    gib = 2**30
    print(f"{'configuration':<37} {'weights':>8} {'activ.':>8} {'temp':>8} {'optim.':>8} {'traced':>8} "
          f"{'preflight tensors':>18} {'preflight total':>16} {'TFLOP/step':>11} {'example':>8}")
    for row in rows:
        k = row["traced_unet_step"]["by_kind"]
        weights = (k.get("param", 0) + k.get("buffer", 0) + row["text_encoder_weight_bytes"]) / gib
        print(f"{row['config']:<37} {weights:>8.2f} {k.get('act', 0) / gib:>8.2f} {k.get('temp', 0) / gib:>8.2f} "
              f"{(k.get('opt', 0) + k.get('grad', 0)) / gib:>8.2f} {row['traced_total_bytes'] / gib:>8.2f} "
              f"{row['preflight_tensor_terms_bytes'] / gib:>18.2f} {row['preflight_estimate_bytes'] / gib:>16.2f} "
              f"{row['traced_unet_step']['tflop_per_step']:>11.2f} "
              f"{row['traced_unet_step']['tflop_per_step'] + row['example_extra_tflop_per_step']:>8.2f}")
    print("GiB at the traced step's peak. 'preflight tensors': memory.py's weights + trainable + activations, to\n"
          "compare with 'traced'; 'preflight total' adds the device's overhead (CPU: runtime and allocator; CUDA:\n"
          "context and fragmentation), what `cdiff train` checks against the free memory. 'TFLOP/step': the\n"
          "UNet forward and backward of cdiff's step (frozen weights get no gradient); 'example': the same plus\n"
          "the VAE and text encoding the diffusers example repeats on every step.")
    print(f"\n{'configuration (on a GPU)':<37} {'reg. images':>12} {'latent caching':>15} {'training step':>14}")
    for row in rows:
        if row["phases_before_training"]:
            ph = row["phases_before_training"]
            print(f"{row['config']:<37} {ph['regularisation_images_bytes'] / gib:>12.2f} "
                  f"{ph['latent_caching_bytes'] / gib:>15.2f} {row['traced_total_bytes'] / gib:>14.2f}")
    print("GiB of tensors at each phase's peak: the phases before the first step (weights on the device added\n"
          "by count, see trace_phases) against the traced step.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
