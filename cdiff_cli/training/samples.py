"""Samples while training: a grid of the same prompts and seeds at chosen steps, so progress can be seen.

As the diffusers example scripts (`--validation_prompt`) and kohya's sd-scripts (`--sample_prompts`) do,
`cdiff train` samples a few images at the end of training (and every `every` steps when asked) and saves
them as one grid per sampling point: a row per prompt, a column per seed, the same seeds every time so
two grids differ only by what the model learned in between.

Sampling never changes the run: it runs without gradients, in eval mode, and restores every random
state it could touch (tests/test_samples.py trains with and without it and compares the weights).
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cdiff_cli.defaults import GEN
from cdiff_cli.errors import CdiffError, option_error

if TYPE_CHECKING:
    from PIL import Image

MIN_CELL = 128  # px: tiny bases (64 px) are enlarged so a person can see them
_LABEL_H = 16
_PAD = 4


@dataclass(frozen=True)
class SampleSettings:
    """What to sample while training. `prompts` empty: "photo of a TOKEN CLASS" for each concept."""

    prompts: tuple[str, ...] = ()
    every: int = 0  # sample every N steps as well; 0: only at the end
    n: int = 4  # images per prompt: seeds seed .. seed + n - 1
    seed: int = 0
    steps: int = GEN.steps
    guidance: float | None = None  # None: the base's own (world bases draw best at 3, others 6)
    scheduler: str = GEN.scheduler

    def points(self, total: int) -> list[int]:
        """The steps after which a grid is made: every `every` steps, and always the last."""
        pts = list(range(self.every, total, self.every)) if self.every > 0 else []
        return pts + [total]


def check_settings(s: SampleSettings) -> None:
    if s.every < 0:
        raise option_error("{sample_every} must be 0 (only at the end) or a number of steps", "sample_every")
    if s.n < 1 or s.steps < 1:
        raise CdiffError("the samples need at least one image and one step")
    if any(not p.strip() for p in s.prompts):
        raise option_error("{sample_prompts} must not be empty", "sample_prompts")


@contextmanager
def _random_states_kept(device: torch.device):
    """Whatever sampling draws, the training's random streams go on as if it had not run."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def grid(rows: list[tuple[str, list]], cell: int) -> Image.Image:
    """One picture: for each (label, images) a line of text over a row of `cell`-px images."""
    from PIL import Image, ImageDraw

    cols = max((len(imgs) for _, imgs in rows), default=1)
    row_h = _LABEL_H + cell + _PAD
    out = Image.new("RGB", (_PAD + cols * (cell + _PAD), _PAD + len(rows) * row_h), (255, 255, 255))
    d = ImageDraw.Draw(out)
    for r, (label, imgs) in enumerate(rows):
        y = _PAD + r * row_h
        d.text((_PAD, y + 2), label, fill=(30, 30, 30))
        for c, im in enumerate(imgs):
            pic = im.convert("RGB")
            if pic.size != (cell, cell):
                pic = pic.resize((cell, cell), Image.NEAREST if pic.width < cell else Image.LANCZOS)
            out.paste(pic, (_PAD + c * (cell + _PAD), y + _LABEL_H))
    return out


@dataclass
class TrainingSampler:
    """Makes the grids of one run into `folder` (step-000100.png, ...); `train` calls it after the steps
    in `settings.points`. Holds what the run reports: the grids made and the seconds they cost."""

    settings: SampleSettings
    folder: Path
    resolution: int
    guidance: float
    grids: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def prompts(self) -> list[str]:
        return list(self.settings.prompts)

    def due(self, done: int, total: int) -> bool:
        """Is `done` one of `settings.points(total)` (without building the list at every step)?"""
        every = self.settings.every
        return done == total or (every > 0 and done % every == 0 and done < total)

    def __call__(self, pipe, step: int, device: torch.device, autocast) -> Path:
        from cdiff_cli.generation import sample, set_scheduler

        t0 = time.perf_counter()
        s = self.settings
        unet, vae = pipe.unet, pipe.vae
        vae_home = next(vae.parameters()).device
        was_training = unet.training
        scheduler = pipe.scheduler
        try:
            unet.eval()
            vae.to(device)  # also makes the pipeline run on `device` (it looks at its first model)
            set_scheduler(pipe, s.scheduler)
            with _random_states_kept(device), autocast:
                rows = [(p, sample(pipe, p, n=s.n, steps=s.steps, guidance=self.guidance, seed=s.seed,
                                   height=self.resolution, width=self.resolution)) for p in s.prompts]
        finally:
            pipe.scheduler = scheduler
            vae.to(vae_home)
            unet.train(was_training)
        path = self._save(rows, step)
        self.seconds += time.perf_counter() - t0
        return path

    def _save(self, rows, step: int) -> Path:
        from PIL.PngImagePlugin import PngInfo

        self.folder.mkdir(parents=True, exist_ok=True)
        meta = PngInfo()
        meta.add_text("parameters", json.dumps({"step": step, **self.record()}))
        path = self.folder / f"step-{step:06d}.png"
        tmp = path.with_suffix(".png.tmp")
        grid(rows, max(self.resolution, MIN_CELL)).save(tmp, format="PNG", pnginfo=meta)
        tmp.replace(path)
        self.grids.append(path)
        return path

    def record(self) -> dict:
        """The settings as the manifest and the PNG carry them."""
        s = self.settings
        return {"prompts": list(s.prompts), "seeds": list(range(s.seed, s.seed + s.n)), "steps": s.steps,
                "guidance": self.guidance, "scheduler": s.scheduler, "every": s.every,
                "resolution": self.resolution}


def clear(folder: Path) -> None:
    """A new run (not a resumed one) starts without the grids of an earlier run of the same name."""
    shutil.rmtree(folder, ignore_errors=True)
