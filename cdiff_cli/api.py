"""cdiff's Python API: what the commands do, as functions with keyword arguments and typed results.

    import cdiff_cli as cdiff

    reg = cdiff.Registry("./my-home")                       # or Registry() for $CDIFF_HOME
    cat = cdiff.train("mycat", "./cat", class_word="cat", registry=reg)
    chair = cdiff.train("mychair", "./chair", class_word="chair", registry=reg)
    both = cdiff.merge(["mycat", "mychair"], registry=reg)
    images = cdiff.generate("<mycat> cat on a <mychair> chair", n=4, registry=reg)

Every function takes the same defaults as its command (both read `cdiff_cli.defaults`), raises
`cdiff_cli.errors.CdiffError` (or a subclass) on bad input, and never prints: pass `progress=` to follow
long work. Heavy modules (torch, diffusers) are imported when a function runs, not at `import cdiff_cli`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cdiff_cli.defaults import GEN, TRAIN
from cdiff_cli.errors import CdiffError
from cdiff_cli.progress import SILENT, Progress
from cdiff_cli.registry import Entry, Registry

if TYPE_CHECKING:
    from PIL.Image import Image

    from cdiff_cli.evaluation.results import EvalRun

__all__ = ["Concept", "Trained", "Registry", "Entry", "train", "merge", "generate", "evaluate", "add", "export",
           "compress"]


@dataclass(frozen=True)
class Concept:
    """One concept of a joint training run: its token, class word and folder of photos."""

    token: str
    class_word: str
    images: Path


@dataclass(frozen=True)
class Trained:
    """What `train` made: the registry entry and how the run went."""

    entry: Entry
    losses: list[float] = field(repr=False)
    seconds: float
    effective_lr: float
    processes: int = 1
    sample_seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        return self.losses[-1]

    @property
    def samples(self) -> Path | None:
        """The grid of samples made at the end of training (None with samples=False)."""
        return self.entry.samples_path


def _registry(registry: Registry | str | Path | None) -> Registry:
    if isinstance(registry, Registry):
        return registry
    return Registry(registry) if registry is not None else Registry()


def train(
    name: str,
    images: str | Path | None = None,
    *,
    class_word: str | None = None,
    token: str | None = None,
    concepts: list[Concept] | None = None,
    base: str | None = None,
    steps: int = TRAIN.steps,
    batch_size: int = TRAIN.batch_size,
    lr: float = TRAIN.lr,
    scale_lr: bool = TRAIN.scale_lr,
    mode: str = TRAIN.mode,
    reg: str = TRAIN.reg,
    reg_dir: str | Path | None = None,
    num_reg: int = TRAIN.num_reg,
    resolution: int | None = None,
    seed: int = TRAIN.seed,
    aug: bool = TRAIN.aug,
    hflip: bool = TRAIN.hflip,
    precision: str = TRAIN.precision,
    gradient_checkpointing: bool = False,
    low_memory: bool = False,
    offload: bool = False,
    aug_pool: int = TRAIN.aug_pool,
    anchor: float = TRAIN.anchor,
    background_weight: float = TRAIN.background_weight,
    device: str = TRAIN.device,
    resume: bool = False,
    checkpoint_every: int | None = None,
    samples: bool = True,
    sample_prompts: list[str] | None = None,
    sample_every: int = TRAIN.sample_every,
    force: bool = False,
    stop=None,
    registry: Registry | str | Path | None = None,
    progress: Progress = SILENT,
) -> Trained:
    """Train one concept (`images`, `class_word`, optional `token`, default "<NAME>") or several jointly
    (`concepts`) into a new registry entry, as `cdiff train` does. Unless `samples` is False, a grid of
    samples of `sample_prompts` (default "photo of a TOKEN CLASS") is made at the end, and every `sample_every`
    steps; `Trained.samples` is the last one's path in the entry. `anchor`: the weight of the anchor on ordinary
    text (`training.anchor`; 0: off, the paper's method). `background_weight`: the loss weight of the background of
    photos with a mask beside them (`NAME.mask.png`, white on the concept; 1: masks ignored).

    `stop`: anything with a `requested` flag; once it is set, the run saves a checkpoint after the current
    step and raises `TrainingStopped` (`resume=True` continues it). cdiff installs no signal handler
    itself: `with cdiff_cli.StopSignals() as stop: train(..., stop=stop)` makes Ctrl-C and SIGTERM do that,
    as they do for `cdiff train`."""
    from cdiff_cli.training import TrainConfig, low_memory_config
    from cdiff_cli.training.entry import ConceptSpec, RegOptions, train_entry
    from cdiff_cli.training.samples import SampleSettings

    if concepts:
        if images is not None or class_word or token:
            raise CdiffError("give either images, class_word [and token], or concepts, not both")
        specs = [ConceptSpec(c.token, c.class_word, Path(c.images)) for c in concepts]
    else:
        if images is None or not class_word:
            raise CdiffError("give images and class_word (or concepts)")
        specs = [ConceptSpec(token or f"<{name}>", class_word, Path(images))]
    if reg not in ("generated", "none"):
        raise CdiffError(f"reg must be 'generated' or 'none', not {reg!r}")
    if reg_dir is not None:
        reg_opts = RegOptions("dir", Path(reg_dir), num_reg)
    else:
        reg_opts = RegOptions(reg, None, num_reg if reg == "generated" else 0)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, scale_lr=scale_lr, mode=mode, resolution=resolution,
                      seed=seed, aug=aug, hflip=hflip, precision=precision,
                      gradient_checkpointing=gradient_checkpointing, aug_pool=aug_pool, offload=offload, anchor=anchor,
                      background_weight=background_weight)
    if low_memory:
        cfg = low_memory_config(cfg)
    if not samples and (sample_prompts or sample_every):
        raise CdiffError("samples=False cannot go with sample_prompts or sample_every")
    sample_settings = SampleSettings(tuple(sample_prompts or ()), sample_every) if samples else None
    entry, result = train_entry(_registry(registry), name, specs, cfg, base=base, reg=reg_opts, device=device,
                                force=force, resume=resume, checkpoint_every=checkpoint_every,
                                samples=sample_settings, stop=stop, progress=progress)
    if entry is None:
        raise CdiffError("this is a secondary process of a multi-process run: only the main process writes the entry")
    return Trained(entry, result.losses, result.seconds, result.effective_lr, result.processes, result.sample_seconds)


def merge(names: list[str], *, name: str | None = None, base: str | None = None, ridge: float = GEN.ridge,
          force: bool = False, registry: Registry | str | Path | None = None,
          progress: Progress = SILENT) -> Entry:
    """Merge concepts into one entry with the closed-form constrained merge, as `cdiff merge` does (one concept
    alone is constrained: its own prompts keep their outputs, the rest is held near the base)."""
    from cdiff_cli.merging.entries import merge_entries

    entry, notes = merge_entries(_registry(registry), list(names), name, base=base, ridge=ridge, force=force,
                                 progress=progress)
    for note in notes:
        progress.warn(note)
    return entry


def generate(
    prompt: str,
    *,
    n: int = GEN.n,
    steps: int = GEN.steps,
    guidance: float | None = GEN.guidance,
    seed: int = GEN.seed,
    height: int | None = None,
    width: int | None = None,
    negative: str | None = None,
    scheduler: str = GEN.scheduler,
    concepts: list[str] | None = None,
    batch_size: int = GEN.batch_size,
    base: str | None = None,
    precision: str = GEN.precision,
    device: str = GEN.device,
    registry: Registry | str | Path | None = None,
    progress: Progress = SILENT,
) -> list[Image]:
    """Images of `prompt`, as `cdiff gen` makes them (image i uses seed + i): the prompt's tokens load their
    concepts (several are merged on the fly), or name the entries with `concepts`. `guidance` None: the
    base's own (3 on nano, else 6). Returns PIL images."""
    from cdiff_cli.generation import base_guidance, prepare_pipeline, resolve_prompt, sample, set_scheduler

    if n < 1 or steps < 1 or batch_size < 1:
        raise CdiffError("n, steps and batch_size must be at least 1")
    reg = _registry(registry)
    entries = resolve_prompt(reg, prompt, concepts)
    spec, pipe, _ = prepare_pipeline(reg, entries, base=base, device=device, precision=precision, progress=progress)
    guidance = base_guidance(spec.ref) if guidance is None else guidance
    set_scheduler(pipe, scheduler)
    with progress.task("generating", n) as bar:
        return sample(pipe, prompt, n=n, steps=steps, guidance=guidance, seed=seed, height=height, width=width,
                      negative=negative, batch_size=batch_size, on_image=bar.advance)


def evaluate(names: list[str], *, out: str | Path | None = None, base: str | None = None, device: str = GEN.device,
             save: bool = True, registry: Registry | str | Path | None = None, progress: Progress = SILENT,
             **settings) -> EvalRun:
    """Score concepts against their base, as `cdiff eval` does; `settings` are the fields of
    `cdiff_cli.evaluation.EvalSettings` (n, steps, guidance, seed, clip, dino, kid_samples...). Writes the
    images and report under `out` (default cdiff-eval/NAME[+NAME...]) and returns the run: per entry its
    scores (and, on a nano-world base, what the oracle reads), the models and the report's paths; its keys
    are those of `cdiff_cli.evaluation.results.EvalRun`."""
    from cdiff_cli.evaluation import EvalSettings, evaluate_entries

    unknown = set(settings) - set(EvalSettings.__dataclass_fields__)
    if unknown:
        raise CdiffError(f"unknown evaluation setting(s): {', '.join(sorted(unknown))}")
    s = replace(EvalSettings(), **settings)
    out_dir = Path(out) if out is not None else Path("cdiff-eval") / "+".join(names)
    return evaluate_entries(_registry(registry), list(names), s, out_dir, base=base, device=device, store=save,
                            progress=progress)


def add(name: str, path: str | Path, *, base: str | None = None, tokens: list[str] | None = None,
        classes: list[str] | None = None, embeddings: list[str | Path] | None = None, force: bool = False,
        registry: Registry | str | Path | None = None) -> Entry:
    """Import a delta (diffusers, reference, cdiff export or k/v LoRA) as a new entry, as `cdiff add` does."""
    from cdiff_cli.transfer import import_entry

    return import_entry(_registry(registry), name, Path(path), base=base, tokens=tokens, classes=classes,
                        embeddings=[Path(e) for e in embeddings] if embeddings else None, force=force)


def export(name: str, out: str | Path, *, format: str = "diffusers", base: str | None = None,  # noqa: A002
           rank: int | None = None, energy: float | None = None, force: bool = False,
           registry: Registry | str | Path | None = None) -> list[Path]:
    """Write an entry in another tool's layout (diffusers, reference, cdiff or lora), as `cdiff export`
    does; returns the files written. Files already in `out` are not overwritten unless `force`."""
    from cdiff_cli.transfer import export_entry

    paths, _ = export_entry(_registry(registry), name, format, Path(out), base=base, rank=rank, energy=energy,
                            force=force)
    return paths


def compress(name: str, *, rank: int | None = None, energy: float | None = None, base: str | None = None,
             registry: Registry | str | Path | None = None, progress: Progress = SILENT) -> tuple[Entry, dict]:
    """Store an entry's k/v updates at low rank, in place, as `cdiff compress` does; returns the entry and
    the report (sizes, ranks kept, the largest change of a k/v layer's output on captions)."""
    from cdiff_cli.compression import compress_entry

    return compress_entry(_registry(registry), name, rank=rank, energy=energy, base=base, progress=progress)
