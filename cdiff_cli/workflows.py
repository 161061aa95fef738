"""The engine's public operations: what each CLI command calls (and what scripts can import).

Each function takes a `Registry`, plain arguments and an optional `Progress`, and returns data; none
of them prints. Errors the user can fix are `CdiffError`s with one clear line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cdiff_cli.base import DTYPES, default_resolution, load_pipeline, pick_device, resolve_base, resolve_precision
from cdiff_cli.core.delta import Delta, apply_delta, check_content
from cdiff_cli.core.prompts import TOKEN_MARK, instance_prompt, own_caption
from cdiff_cli.core.tokens import angle_tokens, canonical, find_tokens, validate_token
from cdiff_cli.defaults import DEFAULT_COMPRESS_ENERGY
from cdiff_cli.errors import CdiffError, NotFoundError, TrainingStopped, reason
from cdiff_cli.hashing import file_sha256
from cdiff_cli.merging.captions import load_captions
from cdiff_cli.progress import SILENT, Progress
from cdiff_cli.registry import (
    SAMPLES_FILE,
    Entry,
    Registry,
    base_record,
    check_delta_file,
    check_same_base,
    same_base,
    validate_name,
)
from cdiff_cli.training.images import ImageItem, check_images, list_images
from cdiff_cli.training.samples import check_settings as check_sample_settings

if TYPE_CHECKING:
    from cdiff_cli.training import TrainResult

# -- train -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConceptSpec:
    token: str
    class_word: str
    images_dir: Path


def parse_concept(spec: str) -> ConceptSpec:
    """`TOKEN:CLASS:DIR` (the folder comes last so it may itself contain ':')."""
    parts = spec.split(":", 2)
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise CdiffError(f"--concept {spec!r}: expected TOKEN:CLASS:DIR, e.g. '<mycat>:cat:./cat_photos'")
    return ConceptSpec(parts[0].strip(), parts[1].strip(), Path(parts[2].strip()))


@dataclass
class RegOptions:
    kind: str = "generated"  # "generated", "none" or "dir"
    folder: Path | None = None
    count: int = 200


def _load_base(base: str | None, device: str | None, precision: str = "fp32", *, in_cpu_memory: bool = False):
    """Load the base with its frozen weights in `precision` (already resolved, see resolve_precision),
    onto the device, or `in_cpu_memory` to wait there for the phases that run on the device."""
    spec = resolve_base(base)
    dev = pick_device(device)
    pipe = load_pipeline(spec, dtype=DTYPES[resolve_precision(precision, dev)], device="cpu" if in_cpu_memory else dev)
    return spec, pipe, dev


def train_entry(
    registry: Registry,
    name: str,
    specs: list[ConceptSpec],
    cfg,
    *,
    base: str | None = None,
    reg: RegOptions | None = None,
    device: str | None = "auto",
    force: bool = False,
    resume: bool = False,
    checkpoint_every: int | None = None,
    samples=None,
    progress: Progress = SILENT,
) -> tuple[Entry | None, TrainResult]:
    """Train one or several concepts jointly into a new registry entry. Returns (entry, result); the
    entry is None on the secondary processes of a multi-process run (only the main one writes).

    The run checkpoints into HOME/checkpoints/NAME every `checkpoint_every` steps (None, the
    default: every `checkpoint.DEFAULT_SECONDS` of training; 0: only when stopped) and when Ctrl-C/SIGTERM
    stops it (exit 130);
    `resume` continues such a run and ends with the weights an uninterrupted run would have.

    `samples` (`samples.SampleSettings`, None: no samples) makes a grid of samples at the end of training
    (and every `samples.every` steps) into HOME/samples/NAME; the last one is kept in the entry's folder.

    The run holds NAME's training lock from start to end: a second run for the same name fails at once
    (BusyError, exit code 3) instead of racing for the checkpoint and the entry."""
    validate_name(name)
    args = dict(base=base, reg=reg, device=device, force=force, resume=resume, checkpoint_every=checkpoint_every,
                samples=samples, progress=progress)
    if int(os.environ.get("RANK", "0")) != 0:  # secondary processes of `accelerate launch` write nothing
        return _train_entry(registry, name, specs, cfg, **args)
    with registry.hold(name):
        return _train_entry(registry, name, specs, cfg, **args)


def _train_entry(registry, name, specs, cfg, *, base, reg, device, force, resume, checkpoint_every, samples, progress):
    from cdiff_cli.training import base_waits_in_cpu_memory, train
    from cdiff_cli.training.checkpoint import Checkpointer, StopRequested, recover

    cfg = replace(cfg)  # resolved below (precision, resolution) without touching the caller's object
    reg = reg or RegOptions()
    ckpt_dir = registry.checkpoints / name
    ckpt = Checkpointer(ckpt_dir, {}, checkpoint_every)
    if int(os.environ.get("RANK", "0")) == 0:
        recover(ckpt_dir)  # under the training lock (see train_entry): finish a save that was killed
    _check_train_request(registry, name, specs, cfg, reg, ckpt, checkpoint_every, resume, force, samples)
    images = {s.token: target_images(s) for s in specs}  # fail fast, before loading a model
    digests = {}  # each photo's sha256, for the run id and the manifest
    for items in images.values():
        digests.update(check_images(items))  # every image decodes, none is a copy of another
    cfg.precision = resolve_precision(cfg.precision, pick_device(device))
    accelerator = _launched_accelerator()
    main = accelerator is None or accelerator.is_main_process
    if accelerator is not None:
        device = str(accelerator.device)
        if not main:
            progress = SILENT
    dev = pick_device(device)
    if cfg.offload and dev.type == "cpu":
        progress.warn("--offload does nothing on the CPU (the weights are in RAM already); training without it")
        cfg.offload = False
    staged = base_waits_in_cpu_memory(cfg, dev)
    spec, pipe, dev = _load_base(base, device, cfg.precision, in_cpu_memory=staged)
    if not cfg.resolution:
        cfg.resolution = default_resolution(pipe)
    _preflight(pipe, cfg, dev, progress)
    for s in specs:
        validate_token(s.token, pipe.tokenizer)
        if not s.class_word.strip():
            raise CdiffError(f"concept {s.token}: --class must not be empty")
    registry.check_tokens_free([s.token for s in specs], replacing=name if force else None)
    base_rec = base_record(spec.ref, pipe.unet)
    if accelerator is not None and not main:
        accelerator.wait_for_everyone()  # the main process generates (and caches) regularisation images
    concepts = _concepts(registry, pipe, specs, images, reg, cfg, base_rec["fingerprint"], dev, staged, progress)
    if accelerator is not None and main:
        accelerator.wait_for_everyone()
    ckpt.description = _run_description(cfg, base_rec["fingerprint"], dev, concepts, digests, reg, accelerator)
    if force and not resume and main:
        ckpt.clear()
    sampler = _sampler(registry, name, samples, specs, spec.ref, cfg.resolution, resume, progress) if main else None
    try:
        result = train(pipe, concepts, cfg, device=dev, progress=progress, accelerator=accelerator,
                       checkpointer=ckpt, resume=resume, keep_pipe=False, sampler=sampler)
    except StopRequested as e:
        if not e.saved:
            raise TrainingStopped(f"stopped at step {e.step}/{e.steps}; the checkpoint could not be saved"
                                  f"{_kept(ckpt)}") from None
        raise TrainingStopped(f"stopped at step {e.step}/{e.steps}; checkpoint saved: run the same command "
                              "with --resume to continue") from None
    if not main:
        return None, result
    manifest = _trained_manifest(specs, concepts, base_rec, cfg, result, reg, images, digests)
    files = {}
    if sampler is not None and sampler.grids:
        manifest["samples"] = {"file": SAMPLES_FILE, **sampler.record(), "grids": len(sampler.grids),
                               "seconds": round(sampler.seconds, 2)}
        files[SAMPLES_FILE] = sampler.grids[-1]
    try:
        entry = registry.create(name, result.delta, manifest, overwrite=force, files=files)
    except CdiffError as e:  # a full disk, a busy name: say what is left to resume from
        e.args = (f"{e}{_kept(ckpt)}",)
        raise
    ckpt.clear()  # only now: if writing the entry failed, the last checkpoint is still there
    return entry, result


def _check_train_request(registry, name, specs, cfg, reg, ckpt, checkpoint_every, resume, force, samples) -> None:
    """Everything about a training request that can be refused before an image is read or a model loaded."""
    if checkpoint_every is not None and checkpoint_every < 0:
        raise CdiffError("--checkpoint-every must be 0 (only when stopped) or a number of steps")
    if resume and not ckpt.exists:
        raise NotFoundError(f"nothing to resume: no checkpoint of {name!r} (they are saved {ckpt.describe()} "
                            "and when training is stopped)")
    if ckpt.exists and not resume and not force:
        info = ckpt.info()
        raise CdiffError(f"{name!r} has an unfinished training (step {info.get('step')}/{info.get('steps')}): "
                         "add --resume to continue it, or --force to start over")
    if registry.exists(name) and not force:
        raise CdiffError(f"concept {name!r} already exists (use --force to replace it)")
    if not specs:
        raise CdiffError("nothing to train: give IMAGES_DIR --class WORD, or --concept TOKEN:CLASS:DIR")
    if cfg.steps < 1 or cfg.batch_size < 1 or not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise CdiffError("--steps, --batch-size and --lr must be positive (and --lr a finite number)")
    if cfg.aug_pool < 0 or (cfg.resolution is not None and cfg.resolution < 8) or reg.count < 0:
        raise CdiffError("--aug-pool and --num-reg must be 0 or more, --resolution at least 8")
    if reg.kind == "dir" and (reg.folder is None or not Path(reg.folder).is_dir()):
        raise NotFoundError(f"regularisation folder not found: {reg.folder}")
    if samples is not None:
        check_sample_settings(samples)


def _concepts(registry, pipe, specs, images, reg, cfg, fp: str, dev, staged: bool, progress) -> list:
    """The run's concepts with their regularisation images: generated by the base (once per class, cached
    in the registry) or read from --reg-dir."""
    from cdiff_cli.training import Concept
    from cdiff_cli.training.regularisation import BATCH, BATCH_LOW_MEMORY, generated_regularisation, real_regularisation

    concepts = []
    reg_by_class: dict[str, list] = {}
    for s in specs:
        reg_items = []
        if reg.kind == "generated" and reg.count > 0:
            if s.class_word not in reg_by_class:
                reg_by_class[s.class_word] = generated_regularisation(
                    pipe,
                    class_word=s.class_word,
                    count=reg.count,
                    seed=cfg.seed,
                    resolution=cfg.resolution,
                    fingerprint=fp,
                    cache_root=registry.cache_dir("reg"),
                    # under --offload one layer at a time, under --low-memory one model at a time (the
                    # UNet's weights with the steps of two images: below the training step's peak)
                    batch_size=BATCH_LOW_MEMORY if staged else BATCH,
                    offload=(dev, "sequential" if cfg.offload else "model") if staged else None,
                    progress=progress,
                )
            reg_items = reg_by_class[s.class_word]
        elif reg.kind == "dir":
            reg_items = real_regularisation(reg.folder, s.class_word, reg.count)
        concepts.append(Concept(s.token, s.class_word, images[s.token], reg_items))
    return concepts


def _run_description(cfg, fp: str, dev, concepts, digests, reg, accelerator) -> dict:
    """Everything the result depends on: a checkpoint only resumes the very same run."""
    from cdiff_cli.training import config_dict

    return {
        "train": config_dict(cfg),
        "base": fp,
        "device": dev.type,  # random numbers (and rounding) differ between devices
        # Images by file name, so that a refusal names the file that changed.
        "concepts": [{"token": c.token, "class": c.class_word, "images": {i.path.name: digests[i.path] for i in c.images},
                      **({"captions": {i.path.name: i.caption for i in c.images}} if own_captions(c) else {}),
                      "reg images": {i.path.name: {"sha256": file_sha256(i.path), "caption": i.caption} for i in c.reg}} for c in concepts],
        "regularisation": {"kind": reg.kind, "count": reg.count, "folder": str(reg.folder) if reg.folder else None},
        # Each process draws its own data: a run resumes only with as many processes.
        "processes": accelerator.num_processes if accelerator is not None else 1,
    }


def _trained_manifest(specs, concepts, base_rec: dict, cfg, result, reg, images, digests) -> dict:
    from cdiff_cli.training import config_dict

    return {
        "kind": "trained",
        "classes": [s.class_word for s in specs],
        "captions": [own_captions(c) for c in concepts],
        "base": base_rec,
        "train": {
            **config_dict(cfg),
            "effective_lr": result.effective_lr,
            "processes": result.processes,
            "effective_batch_size": cfg.batch_size * result.processes,
            "regularisation": {"kind": reg.kind, "count": reg.count if reg.kind != "none" else 0,
                               "folder": str(reg.folder) if reg.folder else None},
            "seconds": round(result.seconds, 2),
            "final_loss": result.losses[-1] if result.losses else None,
        },
        "concepts": [
            {"token": s.token, "class": s.class_word, "images_dir": str(Path(s.images_dir).resolve()),
             "images": [{"file": it.path.name, "sha256": digests[it.path]} for it in images[s.token]]}
            for s in specs
        ],
        "parents": [],
    }


def target_images(spec: ConceptSpec) -> list[ImageItem]:
    """A concept's photos, each with its own caption where `NAME.txt` lies beside it (`{token}` or the token
    marks where the token goes); the others are captioned "photo of a TOKEN CLASS"."""
    items = []
    for it in list_images(spec.images_dir, with_captions=True):
        caption = it.caption and own_caption(it.caption, spec.token)
        if it.caption and caption is None:
            raise CdiffError(f"the caption {it.path.with_suffix('.txt')} does not say where the token goes: write "
                             f"{TOKEN_MARK} (or {spec.token}) in it, as in \"photo of a {TOKEN_MARK} {spec.class_word}\"")
        items.append(replace(it, caption=caption))
    return items


def _sampler(registry, name, samples, specs, base_ref, resolution, resume, progress):
    """The run's TrainingSampler (None without `samples`): default prompts, the base's guidance, its folder
    emptied unless the run resumes."""
    from cdiff_cli.generation import base_guidance
    from cdiff_cli.training.samples import TrainingSampler, clear

    if samples is None:
        return None
    prompts = samples.prompts or tuple(instance_prompt(s.token, s.class_word) for s in specs)
    if not any(s.token in p for p in prompts for s in specs):
        progress.warn(f"no --sample prompt names {' or '.join(s.token for s in specs)}: the samples will not show "
                      "what was learned")
    folder = registry.samples / name
    if not resume:
        clear(folder)
    guidance = samples.guidance if samples.guidance is not None else base_guidance(base_ref)
    return TrainingSampler(replace(samples, prompts=prompts), folder, resolution, guidance)


def own_captions(concept) -> list[str]:
    """The distinct captions a concept's photos carry themselves (none: all use the template)."""
    return list(dict.fromkeys(i.caption for i in concept.images if i.caption))


def _kept(ckpt) -> str:
    """What an interrupted run still has to resume from, as the end of an error message."""
    if not ckpt.exists:
        return " (no checkpoint is kept)"
    return f"; the checkpoint of step {ckpt.info().get('step')} is kept: run the same command with --resume"


def _preflight(pipe, cfg, device, progress: Progress) -> None:
    """Warn before training when the memory estimate exceeds what is free (see cdiff_cli.memory)."""
    from cdiff_cli.memory import available_memory, estimate_for_pipe, preflight_warning

    warning = preflight_warning(estimate_for_pipe(pipe, cfg, device), available_memory(device), cfg.low_memory,
                                cfg.offload, gpu=device.type != "cpu")
    if warning:
        progress.warn(warning)


def _launched_accelerator():
    """An Accelerator when running under `accelerate launch` with several processes, else None."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    if not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "1")  # several CPU processes: gloo data parallel
    acc = Accelerator()
    if acc.num_processes <= 1:
        raise CdiffError("WORLD_SIZE > 1 but accelerate did not start a process group; launch with `accelerate launch`")
    return acc


# -- merge -----------------------------------------------------------------------------------------


def _gram(registry: Registry, pipe, fp: str):
    from cdiff_cli.merging import regulariser_gram

    return regulariser_gram(pipe, list(load_captions()), registry.writable_cache_dir("gram"), fp)


def _merge_loaded(registry, pipe, fp, entries: list[Entry], ridge: float, progress: Progress):
    from cdiff_cli.merging import merge_deltas

    G = _gram(registry, pipe, fp)
    deltas = [e.load_delta(pipe.unet) for e in entries]
    classes = [e.classes or ["" for _ in e.tokens] for e in entries]
    return merge_deltas(pipe, deltas, classes, G=G, ridge=ridge, captions=[e.captions for e in entries],
                        progress=progress)


def merge_entries(
    registry: Registry,
    names: list[str],
    out_name: str | None = None,
    *,
    base: str | None = None,
    ridge: float | None = None,
    device: str | None = "cpu",
    force: bool = False,
    progress: Progress = SILENT,
) -> tuple[Entry, list[str]]:
    from cdiff_cli.merging import DEFAULT_RIDGE

    if len(names) < 2:
        raise CdiffError("give at least two concepts to merge")
    if len(set(names)) != len(names):
        raise CdiffError("each concept may be named only once")
    if ridge is not None and not (math.isfinite(ridge) and ridge > 0):
        raise CdiffError(f"--ridge must be a positive number, not {ridge}")
    out_name = "+".join(names) if out_name is None else out_name  # --name "" is refused, not the default
    validate_name(out_name)
    if registry.exists(out_name) and not force:
        raise CdiffError(f"concept {out_name!r} already exists (use --force to replace it)")
    entries = [registry.get(n) for n in names]
    check_same_base(entries)
    _check_token_collisions(entries)
    spec, pipe, _ = _load_base(base or entries[0].base.get("ref"), device)
    base_rec = base_record(spec.ref, pipe.unet)
    fp = base_rec["fingerprint"]
    check_same_base(entries, base_rec)
    ridge = DEFAULT_RIDGE if ridge is None else ridge
    delta, notes = _merge_loaded(registry, pipe, fp, entries, ridge, progress)
    manifest = {
        "kind": "merged",
        "classes": [c for e in entries for c in (e.classes or ["" for _ in e.tokens])],
        "captions": [c for e in entries for c in e.captions],
        "base": base_rec,
        "merge": {"method": "closed-form", "ridge": ridge, "regulariser_captions": len(load_captions())},
        "parents": [{"name": e.name, "id": e.id} for e in entries],
    }
    return registry.create(out_name, delta, manifest, overwrite=force), notes


def _check_token_collisions(entries: list[Entry]) -> None:
    seen: dict[str, str] = {}
    for e in entries:
        for t in e.tokens:
            if canonical(t) in seen:
                raise CdiffError(f"token {t!r} is used by both {seen[canonical(t)]!r} and {e.name!r}")
            seen[canonical(t)] = e.name


# -- gen -------------------------------------------------------------------------------------------


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
    # Prefer an explicit merge of exactly these entries, if the user made one.
    if len(entries) > 1:
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
        _check_token_collisions(entries)
    ref = base or (entries[0].base.get("ref") if entries else None)
    if offload is not None and pick_device(device).type != "cuda":
        progress.warn("--low-memory and --offload are for a CUDA GPU; generating without them")
        offload = None
    spec, pipe, dev = _load_base(ref, device, precision, in_cpu_memory=offload is not None)
    delta = _write_delta(registry, pipe, spec, entries, ridge, progress)
    if offload is not None:
        from cdiff_cli.offload import enable_pipeline_offload

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
        key = hashlib.sha256(json.dumps([sorted(str(e.manifest.get("content_hash", e.id)) for e in entries), ridge]).encode())
        folder = registry.writable_cache_dir("merges")  # None on a read-only registry: merged in memory
        cached = folder / f"{key.hexdigest()[:20]}.safetensors" if folder is not None else None
        if cached is not None and cached.is_file():
            delta = Delta.load(cached)
        else:
            delta, _ = _merge_loaded(registry, pipe, fp, entries, ridge, progress)
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


# -- add / export ----------------------------------------------------------------------------------


def import_entry(
    registry: Registry,
    name: str,
    path: Path,
    *,
    base: str | None = None,
    tokens: list[str] | None = None,
    classes: list[str] | None = None,
    embeddings: list[Path] | None = None,
    force: bool = False,
) -> Entry:
    from cdiff_cli.formats import check_against_base, detect_format, load_delta_file

    validate_name(name)
    if registry.exists(name) and not force:
        raise CdiffError(f"concept {name!r} already exists (use --force to replace it)")
    if not Path(path).exists():
        raise NotFoundError(f"not found: {path}")
    fmt = detect_format(path)
    spec, pipe = _load_export_base(path, base)
    delta = load_delta_file(path, base_unet=pipe.unet, token_rename=tokens or None, embeddings=embeddings)
    check_content(delta, path)
    check_against_base(delta, pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
    for t in delta.tokens:
        validate_token(t, pipe.tokenizer)
    registry.check_tokens_free(delta.tokens, replacing=name if force else None)
    if classes and len(classes) != len(delta.tokens):
        raise CdiffError(f"--class was given {len(classes)} time(s) but the delta has {len(delta.tokens)} token(s)")
    manifest = {
        "kind": "imported",
        "classes": classes or ["" for _ in delta.tokens],
        "base": base_record(spec.ref, pipe.unet),
        "source": {"path": str(Path(path).resolve()), "format": fmt},
        "parents": [],
    }
    return registry.create(name, delta, manifest, overwrite=force)


def _load_export_base(path: Path, base: str | None):
    """(spec, pipeline) for importing `path`: `base`, else the base its export recorded (cdiff_base.json);
    a base that is not the recorded one is refused."""
    from cdiff_cli.formats import BASE_FILE, read_base_record

    recorded = read_base_record(path)
    try:
        spec, pipe, _ = _load_base(base or (recorded or {}).get("ref"), "cpu")
    except CdiffError as e:
        if base is None and recorded is not None:  # say where the ref came from, and the way out
            e.args = (f"{e} (the base named by {BASE_FILE} of the export; give --base with that model)",)
        raise
    if recorded is not None and not same_base(recorded, rec := base_record(spec.ref, pipe.unet)):
        raise CdiffError(f"{path} was exported from another base model, {recorded['ref']} (fingerprint "
                         f"{recorded['fingerprint']}), not {rec['ref']} (fingerprint {rec['fingerprint']}): give "
                         "--base with the model it was trained on")
    return spec, pipe


EXPORT_FORMATS = ("diffusers", "reference", "cdiff", "lora")


def _load_entry_base(entry: Entry, base: str | None):
    """(spec, pipeline) of the base an entry was trained on (or `base`, which must be the same model), in fp32
    on the CPU: for work that needs the exact W0 (LoRA differences, low-rank expansion)."""
    spec, pipe, _ = _load_base(base or entry.base.get("ref"), "cpu")
    check_same_base([entry], base_record(spec.ref, pipe.unet))
    return spec, pipe


def _check_rank_energy(rank: int | None, energy: float | None) -> None:
    if rank is not None and energy is not None:
        raise CdiffError("give --rank or --energy, not both")
    if rank is not None and rank < 1:
        raise CdiffError(f"--rank must be at least 1, not {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise CdiffError(f"--energy must be in (0, 1], not {energy}")


def export_entry(
    registry: Registry,
    name: str,
    fmt: str,
    out_dir: Path,
    *,
    base: str | None = None,
    rank: int | None = None,
    energy: float | None = None,
    force: bool = False,
) -> tuple[list[Path], dict]:
    """Write an entry in another tool's layout; returns (files, details). `rank`/`energy` apply to "lora"
    (default: full rank, exact up to fp16); the LoRA holds W - W0, so the entry's base is loaded. Every
    format gets `cdiff_base.json` beside its files: the base it belongs to, which `cdiff add` reads.

    The files are written into a folder of their own first and moved into `out_dir` only when all are
    there; a file of the same name already in `out_dir` is refused unless `force`, and `out_dir` may not
    lie inside the registry."""
    from cdiff_cli.formats import write_base_record

    entry = registry.get(name)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CdiffError(f"cannot export to {out_dir}: it exists and is not a folder")
    registry.check_outside(out_dir)
    if fmt != "lora" and (rank is not None or energy is not None):
        raise CdiffError("--rank and --energy apply to --format lora only")
    _check_rank_energy(rank, energy)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".cdiff-export-", dir=out_dir.parent))
    except OSError as e:
        raise CdiffError(f"cannot export to {out_dir}: {reason(e)}") from e
    try:
        files, details = _export_files(registry, entry, fmt, staging, base, rank, energy)
        if entry.base.get("ref") and entry.base.get("fingerprint"):
            files.append(write_base_record(staging, entry.base))
        return _move_in(staging, [f.relative_to(staging) for f in files], out_dir, force), details
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_in(staging: Path, names: list[Path], out_dir: Path, force: bool) -> list[Path]:
    """Move the staged files into `out_dir`, none of them over an existing file unless `force`."""
    taken = [n for n in names if (out_dir / n).exists() or (out_dir / n).is_symlink()]
    if taken and not force:
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise CdiffError(f"{out_dir / taken[0]} already exists{more}: add --force to overwrite, or choose another -o")
    try:
        for n in names:
            (out_dir / n).parent.mkdir(parents=True, exist_ok=True)
            if (out_dir / n).is_dir() and not (out_dir / n).is_symlink():
                raise CdiffError(f"cannot export to {out_dir}: {out_dir / n} is a folder")
            os.replace(staging / n, out_dir / n)
    except OSError as e:
        raise CdiffError(f"cannot export to {out_dir}: {reason(e)}") from e
    return [out_dir / n for n in names]


def _export_files(registry, entry: Entry, fmt: str, out_dir: Path, base, rank, energy) -> tuple[list[Path], dict]:
    from cdiff_cli.formats import export_diffusers, export_reference

    name = entry.name
    if fmt == "cdiff":  # the entry as stored (compressed or not), with its manifest
        out_dir.mkdir(parents=True, exist_ok=True)
        with registry.reading(name) as now:  # delta and manifest of one version, never a partial copy
            check_delta_file(now)
            shutil.copyfile(now.delta_path, out_dir / "delta.safetensors")
            (out_dir / "manifest.json").write_text(json.dumps(now.manifest, indent=2) + "\n", encoding="utf-8")
        return [out_dir / "delta.safetensors", out_dir / "manifest.json"], {}
    pipe = None
    if fmt == "lora" or entry.compressed:  # W0 is needed
        spec, pipe = _load_entry_base(entry, base)
    delta = entry.load_delta(pipe.unet if pipe is not None else None)
    if fmt == "diffusers":
        return export_diffusers(delta, out_dir), {}
    if fmt == "reference":
        return export_reference(delta, out_dir), {}
    if fmt == "lora":
        from cdiff_cli.formats.lora import export_lora

        base_weights = {n: p for n, p in pipe.unet.named_parameters() if n in delta.weights}
        meta = {"cdiff_entry": entry.name, "cdiff_base": str(spec.ref),
                "cdiff_base_fingerprint": str(entry.base.get("fingerprint", ""))}
        return export_lora(delta, base_weights, out_dir, entry.name, rank=rank, energy=energy or 1.0, metadata=meta)
    raise CdiffError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")


# -- compress --------------------------------------------------------------------------------------

FIDELITY_CAPTIONS = 256  # ordinary captions whose k/v outputs measure the compression error


def compress_entry(
    registry: Registry,
    name: str,
    *,
    rank: int | None = None,
    energy: float | None = None,
    base: str | None = None,
    progress: Progress = SILENT,
) -> tuple[Entry, dict]:
    """Rewrite an entry with its k/v updates as low-rank factors (atomically, in place); returns the
    entry and a report: sizes, ranks, and the largest change of any k/v layer's output on captions."""
    from cdiff_cli.compression import compress_delta, output_fidelity, ranks, stored_bytes
    from cdiff_cli.merging import prompt_features

    _check_rank_energy(rank, energy)
    if rank is None and energy is None:
        energy = DEFAULT_COMPRESS_ENERGY
    entry = registry.get(name)
    if entry.compressed:
        raise CdiffError(f"concept {name!r} is already compressed")
    spec, pipe = _load_entry_base(entry, base)
    progress.note(f"factorising the k/v updates of {name}")
    delta = entry.load_delta(pipe.unet)
    base_w = {n: p for n, p in pipe.unet.named_parameters() if n in delta.weights}
    low = compress_delta(delta, base_w, rank=rank, energy=energy)
    with torch.no_grad():
        X = torch.cat(prompt_features(pipe, list(load_captions())[:FIDELITY_CAPTIONS]))
    r = ranks(low)
    report = {
        "rank": rank,
        "energy": energy,
        "min_rank": min(r, default=0),
        "max_rank": max(r, default=0),
        "bytes_before": int(entry.manifest.get("size_bytes") or entry.delta_path.stat().st_size),
        "bytes_after": stored_bytes(low),
        "captions": FIDELITY_CAPTIONS,
        **output_fidelity(delta, low.expanded(base_w), X),
    }
    keep = {k: v for k, v in entry.manifest.items()
            if k not in ("name", "id", "tokens", "mode", "size_bytes", "content_hash", "created", "cdiff_version", "metrics")}
    with registry.lock(name):  # replace exactly the version that was compressed, not one written meanwhile
        if registry.get(name).manifest.get("content_hash") != entry.manifest.get("content_hash"):
            raise CdiffError(f"concept {name!r} was replaced while it was being compressed; run it again")
        new = registry.create(name, low, {**keep, "storage": "lowrank", "compression": report}, overwrite=True)
        report["bytes_after"] = int(new.manifest["size_bytes"])  # the file as written, header included
        registry.update_manifest(name, compression=report)  # still under the lock: this very version
    return registry.get(name), report
