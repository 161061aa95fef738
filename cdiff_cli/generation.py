"""Generation: the base with a prompt's entries written into it (several merged on the fly, cached), sampling
with it, and PNGs that carry their generation parameters."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

from cdiff_cli.core.delta import Delta, apply_delta
from cdiff_cli.core.tokens import angle_tokens, canonical, find_tokens
from cdiff_cli.defaults import SCHEDULERS  # noqa: E402,F401  (re-exported)
from cdiff_cli.errors import CdiffError, Message, NotFoundError
from cdiff_cli.merging.captions import captions_for
from cdiff_cli.merging.entries import check_token_collisions, merge_loaded
from cdiff_cli.models.base import load_base, pick_device
from cdiff_cli.progress import SILENT, Progress
from cdiff_cli.registry import Entry, Registry, base_record, check_same_base


def set_scheduler(pipe, name: str) -> None:
    import diffusers

    if name not in SCHEDULERS:
        raise CdiffError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls_name = SCHEDULERS[name]
    if cls_name is None or type(pipe.scheduler).__name__ == cls_name:
        return
    cls = getattr(diffusers, cls_name)
    # A base trained on a zero-terminal-SNR schedule (nano) samples wrongly with a scheduler that cannot
    # rescale its betas: from_config would drop the flag and silently fall back to the leaky schedule.
    if pipe.scheduler.config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in inspect.signature(cls).parameters:
        usable = [n for n, c in SCHEDULERS.items() if c and "rescale_betas_zero_snr" in inspect.signature(getattr(diffusers, c)).parameters]
        raise CdiffError(f"scheduler {name!r} cannot follow this base's zero-terminal-SNR schedule; "
                         f"choose one of {', '.join(usable)}")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def base_guidance(base_ref: str | None) -> float:
    """The guidance scale a base draws best at when none is asked for: 3 for a nano-world base (measured:
    one object right in 93 % of held-out captions at 3, 89 % at 6; docs/nano-world.md), else the usual 6."""
    from cdiff_cli.defaults import DEFAULT_GUIDANCE, WORLD_GUIDANCE
    from cdiff_cli.world.scores import is_world_base

    return WORLD_GUIDANCE if is_world_base(base_ref) else DEFAULT_GUIDANCE


def generators(seed: int, n: int) -> list:
    """One CPU generator per image: image i of seed s is the same whatever the batch size."""
    import torch

    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


def sample(
    pipe,
    prompt: str,
    *,
    n: int = 1,
    steps: int = 25,
    guidance: float = 6.0,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    negative: str | None = None,
    batch_size: int = 4,
    on_image=None,
):
    """Generate `n` images of `prompt`; `on_image(i)` is called as each batch finishes."""
    import torch

    factor = int(pipe.vae_scale_factor)
    for v, what in ((height, "--height"), (width, "--width")):
        if v is not None and (v <= 0 or v % factor):
            raise CdiffError(f"{what} must be a positive multiple of {factor}")
    images = []
    gens = generators(seed, n)
    for s in range(0, n, batch_size):
        k = min(batch_size, n - s)
        with torch.no_grad():
            out = pipe(
                prompt,
                negative_prompt=negative,
                num_images_per_prompt=k,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gens[s : s + k],
                height=height,
                width=width,
            ).images
        images.extend(out)
        if on_image is not None:
            on_image(len(out))
    return images


def slug(text: str, limit: int = 48) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (s[:limit].rstrip("-")) or "image"


def save_pngs(images, out_dir: str | Path, prompt: str, params: dict) -> list[Path]:
    """Save images as PNGs with a `parameters` text chunk (JSON); never overwrite existing files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = slug(prompt)
    paths = []
    for i, img in enumerate(images):
        meta = PngInfo()
        meta.add_text("parameters", json.dumps({**params, "prompt": prompt, "index": i, "seed": params["seed"] + i}))
        k = 0
        while True:
            p = out / f"{base}-{params['seed'] + i}{f'-{k}' if k else ''}.png"
            if not p.exists():
                break
            k += 1
        img.save(p, pnginfo=meta)
        paths.append(p)
    return paths


# -- the pipeline for a prompt ------------------------------------------------------------------------


def resolve_prompt(registry: Registry, prompt: str, concepts: list[str] | None = None) -> list[Entry]:
    """The registry entries a prompt needs: named with --concept, else found from its tokens."""
    if concepts:
        return [registry.get(n) for n in concepts]
    owners = registry.token_owners()
    used = find_tokens(prompt, list(owners))
    unknown = [t for t in angle_tokens(prompt) if canonical(t) not in owners]
    if unknown:
        raise NotFoundError(f"unknown concept token(s) in the prompt: {', '.join(unknown)} (see `cdiff list`)")
    entries: list[Entry] = []
    for t in used:
        if owners[t] not in entries:
            entries.append(owners[t])
    # Prefer an explicit merge of exactly these entries, if the user made one (for one entry: it constrained).
    if entries:
        wanted = {e.name for e in entries}
        for e in registry.entries():
            if e.kind == "merged" and set(e.parents) == wanted:
                return [e]
    return entries


def prepare_pipeline(
    registry: Registry,
    entries: list[Entry],
    *,
    base: str | None = None,
    device: str | None = "auto",
    precision: str = "fp32",
    ridge: float | None = None,
    offload: str | None = None,
    progress: Progress = SILENT,
):
    """Load the base and write the entries' delta into it (merging several on the fly, cached).

    `offload` ("model" or "sequential", for a small GPU): the base is loaded into CPU memory and the
    returned pipeline runs under diffusers' CPU offload (`offload.enable_pipeline_offload`), decoding
    one image at a time; on a CPU it changes nothing and says so."""
    if entries:
        check_same_base(entries)
        check_token_collisions(entries)
    ref = base or (entries[0].base.get("ref") if entries else None)
    if offload is not None and pick_device(device).type != "cuda":
        progress.warn(Message("{low_memory} and {offload} are for a CUDA GPU; generating without them", "low_memory", "offload"))
        offload = None
    spec, pipe, dev = load_base(ref, device, precision, in_cpu_memory=offload is not None)
    delta = _write_delta(registry, pipe, spec, entries, ridge, progress)
    if offload is not None:
        from cdiff_cli.models.offload import enable_pipeline_offload

        enable_pipeline_offload(pipe, dev, offload)
        pipe.vae.enable_slicing()
    return spec, pipe, delta


def _write_delta(registry, pipe, spec, entries: list[Entry], ridge: float | None, progress: Progress) -> Delta | None:
    """The entries' delta (merged on the fly and cached when several), written into `pipe`."""
    from cdiff_cli.merging import DEFAULT_RIDGE

    if not entries:
        return None
    base_rec = base_record(spec.ref, pipe.unet)
    fp = base_rec["fingerprint"]
    check_same_base(entries, base_rec)
    if len(entries) == 1:
        delta = entries[0].load_delta(pipe.unet)
    else:
        ridge = DEFAULT_RIDGE if ridge is None else ridge
        captions = captions_for(spec.ref)
        key = hashlib.sha256(json.dumps([sorted(str(e.manifest.get("content_hash", e.id)) for e in entries), ridge,
                                         hashlib.sha256("\n".join(captions).encode()).hexdigest()]).encode())
        folder = registry.writable_cache_dir("merges")  # None on a read-only registry: merged in memory
        cached = folder / f"{key.hexdigest()[:20]}.safetensors" if folder is not None else None
        if cached is not None and cached.is_file():
            delta = Delta.load(cached)
        else:
            delta, _ = merge_loaded(registry, pipe, fp, entries, ridge, progress, captions)
            if cached is not None:
                _cache_merge(delta, cached)
    apply_delta(pipe, delta)
    return delta


def _cache_merge(delta: Delta, cached: Path) -> None:
    """Keep a merge for the next `gen`; a cache that cannot be written (a full disk) costs only the time."""
    tmp = cached.with_name(f"{cached.stem}.{os.getpid()}.tmp")  # concurrent `gen`s never share one
    try:
        delta.save(tmp)
        tmp.replace(cached)
    except Exception:  # OSError, or safetensors' own error type on a full disk
        tmp.unlink(missing_ok=True)
