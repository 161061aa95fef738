"""Training a registry entry: what `cdiff train` (and `cdiff_cli.train`) runs around the loop of
`training.loop`: checks the request, reads the photos, loads the base, gathers regularisation images,
trains under the entry's lock with checkpoints and samples, and writes the entry."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cdiff_cli.core.prompts import TOKEN_MARK, instance_prompt, own_caption
from cdiff_cli.core.tokens import validate_token
from cdiff_cli.errors import CdiffError, Message, NotFoundError, TrainingStopped, already_exists, option_error
from cdiff_cli.hashing import file_sha256
from cdiff_cli.models.base import default_resolution, load_base, pick_device, resolve_precision
from cdiff_cli.progress import SILENT, Progress
from cdiff_cli.registry import (
    SAMPLES_FILE,
    Entry,
    Registry,
    base_record,
    validate_name,
)
from cdiff_cli.registry import manifest as manifests
from cdiff_cli.registry.manifest import Manifest
from cdiff_cli.training.images import ImageItem, check_images, list_images
from cdiff_cli.training.samples import check_settings as check_sample_settings

if TYPE_CHECKING:
    from cdiff_cli.training import TrainResult


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
    stop=None,
    progress: Progress = SILENT,
) -> tuple[Entry | None, TrainResult]:
    """Train one or several concepts jointly into a new registry entry. Returns (entry, result); the
    entry is None on the secondary processes of a multi-process run (only the main one writes).

    The run checkpoints into HOME/checkpoints/NAME every `checkpoint_every` steps (None, the
    default: every `checkpoint.DEFAULT_SECONDS` of training; 0: only when stopped) and when `stop` (anything
    with a `requested` flag: the CLI passes a `stopping.StopSignals()` it has entered, so that Ctrl-C and
    SIGTERM stop the run) asks it to, then raising TrainingStopped (exit 130);
    `resume` continues such a run and ends with the weights an uninterrupted run would have.

    `samples` (`samples.SampleSettings`, None: no samples) makes a grid of samples at the end of training
    (and every `samples.every` steps) into HOME/samples/NAME; the last one is kept in the entry's folder.

    The run holds NAME's training lock from start to end: a second run for the same name fails at once
    (BusyError, exit code 3) instead of racing for the checkpoint and the entry."""
    validate_name(name)
    args = dict(base=base, reg=reg, device=device, force=force, resume=resume, checkpoint_every=checkpoint_every,
                samples=samples, stop=stop, progress=progress)
    if int(os.environ.get("RANK", "0")) != 0:  # secondary processes of `accelerate launch` write nothing
        return _train_entry(registry, name, specs, cfg, **args)
    with registry.hold(name):
        return _train_entry(registry, name, specs, cfg, **args)


def _train_entry(registry, name, specs, cfg, *, base, reg, device, force, resume, checkpoint_every, samples, stop,
                 progress):
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
        progress.warn(Message("{offload} does nothing on the CPU (the weights are in RAM already); training without it", "offload"))
        cfg.offload = False
    staged = base_waits_in_cpu_memory(cfg, dev)
    spec, pipe, dev = load_base(base, device, cfg.precision, in_cpu_memory=staged)
    if not cfg.resolution:
        cfg.resolution = default_resolution(pipe)
    _preflight(pipe, cfg, dev, progress)
    for s in specs:
        validate_token(s.token, pipe.tokenizer)
        if not s.class_word.strip():
            raise option_error("concept {token}: {class_word} must not be empty", "class_word", token=s.token)
    registry.check_tokens_free([s.token for s in specs], replacing=name if force else None)
    base_rec = base_record(spec.ref, pipe.unet)
    gram = _anchor_gram(registry, pipe, spec.ref, base_rec["fingerprint"], cfg, specs)
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
                       checkpointer=ckpt, resume=resume, keep_pipe=False, sampler=sampler, stop=stop, anchor_gram=gram)
    except StopRequested as e:
        if not e.saved:
            raise TrainingStopped(Message("stopped at step {step}/{steps}; the checkpoint could not be saved",
                                          step=e.step, steps=e.steps)).add(_kept(ckpt)) from None
        raise TrainingStopped(Message("stopped at step {step}/{steps}; checkpoint saved: run the same command with "
                                      "{resume} to continue", "resume", step=e.step, steps=e.steps)) from None
    if not main:
        return None, result
    manifest = _trained_manifest(specs, concepts, base_rec, cfg, result, reg, images, digests)
    files = {}
    if sampler is not None and sampler.grids:
        manifest = manifest.with_fields(samples={"file": SAMPLES_FILE, **sampler.record(), "grids": len(sampler.grids),
                                                 "seconds": round(sampler.seconds, 2)})
        files[SAMPLES_FILE] = sampler.grids[-1]
    try:
        entry = registry.create(name, result.delta, manifest, overwrite=force, files=files)
    except CdiffError as e:  # a full disk, a busy name: say what is left to resume from
        e.add(_kept(ckpt))
        raise
    ckpt.clear()  # only now: if writing the entry failed, the last checkpoint is still there
    return entry, result


def _anchor_gram(registry, pipe, base_ref: str, fp: str, cfg, specs):
    """The anchor's Gram matrix (None when the run has no anchor): over the base's ordinary captions, as the merge's
    regulariser (sharing its cache), with the class prompts pinned."""
    from cdiff_cli.merging.captions import captions_for
    from cdiff_cli.training.anchor import anchor_gram

    if not cfg.anchor:
        return None
    return anchor_gram(pipe, list(captions_for(base_ref)), [s.class_word for s in specs],
                       cache_dir=registry.writable_cache_dir("gram"), fingerprint=fp)


def _check_train_request(registry, name, specs, cfg, reg, ckpt, checkpoint_every, resume, force, samples) -> None:
    """Everything about a training request that can be refused before an image is read or a model loaded."""
    if checkpoint_every is not None and checkpoint_every < 0:
        raise option_error("{checkpoint_every} must be 0 (only when stopped) or a number of steps", "checkpoint_every")
    if resume and not ckpt.exists:
        raise NotFoundError(f"nothing to resume: no checkpoint of {name!r} (they are saved {ckpt.describe()} "
                            "and when training is stopped)")
    if ckpt.exists and not resume and not force:
        info = ckpt.info()
        raise CdiffError(f"{name!r} has an unfinished training (step {info.get('step')}/{info.get('steps')}): "
                         "add --resume to continue it, or --force to start over")
    if registry.exists(name) and not force:
        raise already_exists(name)
    if not specs:
        raise CdiffError("nothing to train: give IMAGES_DIR --class WORD, or --concept TOKEN:CLASS:DIR")
    cfg.check()
    if cfg.aug_pool < 0 or (cfg.resolution is not None and cfg.resolution < 8) or reg.count < 0:
        raise option_error("{aug_pool} and {num_reg} must be 0 or more, {resolution} at least 8", "aug_pool", "num_reg",
                           "resolution")
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
                      **({"masks": {i.path.name: digests[i.mask] for i in c.images if i.mask},
                          "background_weight": cfg.background_weight} if _masked(c.images) else {}),
                      **({"captions": {i.path.name: i.caption for i in c.images}} if own_captions(c) else {}),
                      "reg images": {i.path.name: {"sha256": file_sha256(i.path), "caption": i.caption} for i in c.reg}} for c in concepts],
        "regularisation": {"kind": reg.kind, "count": reg.count, "folder": str(reg.folder) if reg.folder else None},
        # Each process draws its own data: a run resumes only with as many processes.
        "processes": accelerator.num_processes if accelerator is not None else 1,
    }


def _trained_manifest(specs, concepts, base_rec: dict, cfg, result, reg, images, digests) -> Manifest:
    from cdiff_cli.training import config_dict

    train = {
        **config_dict(cfg),
        "effective_lr": result.effective_lr,
        "processes": result.processes,
        "effective_batch_size": cfg.batch_size * result.processes,
        "regularisation": {"kind": reg.kind, "count": reg.count if reg.kind != "none" else 0,
                           "folder": str(reg.folder) if reg.folder else None},
        "seconds": round(result.seconds, 2),
        "final_loss": result.losses[-1] if result.losses else None,
        # With masks the weight is recorded even at its default (config_dict leaves the default out).
        **({"background_weight": cfg.background_weight} if any(_masked(c.images) for c in concepts) else {}),
    }
    photos = [{"token": s.token, "class": s.class_word, "images_dir": str(Path(s.images_dir).resolve()),
               "images": [{"file": it.path.name, "sha256": digests[it.path],
                           **({"mask_sha256": digests[it.mask]} if it.mask else {})} for it in images[s.token]]}
              for s in specs]
    return manifests.trained([s.class_word for s in specs], [own_captions(c) for c in concepts], base_rec, train,
                             photos)


def _masked(items: list[ImageItem]) -> bool:
    return any(it.mask is not None for it in items)


def target_images(spec: ConceptSpec) -> list[ImageItem]:
    """A concept's photos, each with its own caption where `NAME.txt` lies beside it (`{token}` or the token
    marks where the token goes); the others are captioned "photo of a TOKEN CLASS". Where `NAME.mask.png` lies
    beside a photo, training weighs its background by `TrainConfig.background_weight`."""
    items = []
    for it in list_images(spec.images_dir, with_captions=True, with_masks=True):
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
        progress.warn(Message("no {sample_prompts} prompt names {tokens}: the samples will not show what was learned",
                              "sample_prompts", tokens=" or ".join(s.token for s in specs)))
    folder = registry.samples / name
    if not resume:
        clear(folder)
    guidance = samples.guidance if samples.guidance is not None else base_guidance(base_ref)
    return TrainingSampler(replace(samples, prompts=prompts), folder, resolution, guidance)


def own_captions(concept) -> list[str]:
    """The distinct captions a concept's photos carry themselves (none: all use the template)."""
    return list(dict.fromkeys(i.caption for i in concept.images if i.caption))


def _kept(ckpt) -> Message:
    """What an interrupted run still has to resume from, as the end of an error message."""
    if not ckpt.exists:
        return Message(" (no checkpoint is kept)")
    return Message("; the checkpoint of step {kept_step} is kept: run the same command with {resume}", "resume",
                   kept_step=ckpt.info().get("step"))


def _preflight(pipe, cfg, device, progress: Progress) -> None:
    """Warn before training when the memory estimate exceeds what is free (see cdiff_cli.models.memory)."""
    from cdiff_cli.models.memory import available_memory, estimate_for_pipe, preflight_warning

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
