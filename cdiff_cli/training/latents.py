"""The images a run trains on, as latents: decoded once, augmented, VAE-encoded once before the first step.

Every regularisation image (both flips) and a pool of `aug_pool` augmented variants of every target image
are encoded in batches before training; the VAE then leaves the accelerator. With `aug_pool=0` a fresh
augmentation is drawn and encoded every step instead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from cdiff_cli.progress import Progress
from cdiff_cli.training.images import (
    Augmentation,
    ImageItem,
    apply_augmentation,
    latent_mask,
    mask_tensor,
    object_weight,
    open_rgb,
    sample_augmentation,
    to_tensor,
)

# Images per VAE encoding while caching latents. Batching the VAE buys little speed, and its
# activations grow with the batch: at 512 px 0.3 GiB per image in half precision (traced), so at batch 8
# the caching, not the training step, would set the run's peak. On a GPU one at a time under
# --low-memory/--offload, whose steps need about 2.0/0.6 GiB (benchmarks/trace_memory.py).
ENCODE_BATCH = 2
ENCODE_BATCH_LOW_MEMORY = 1


@dataclass
class Latent:
    """A latent distribution (drawn from at every use), with the target's loss mask and caption prefix."""

    mean: torch.Tensor
    std: torch.Tensor
    mask: torch.Tensor | None = None
    prefix: str = ""

    def sample(self) -> torch.Tensor:
        return self.mean + self.std * torch.randn_like(self.std)


class Encoder:
    """VAE encoding in batches, returning the latent distribution per image."""

    def __init__(self, vae, device, batch: int = ENCODE_BATCH):
        self.vae, self.device, self.batch = vae, device, batch
        self.dtype = next(vae.parameters()).dtype

    @torch.no_grad()
    def __call__(self, images: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for s in range(0, len(images), self.batch):
            x = torch.stack(images[s : s + self.batch]).to(self.device, self.dtype)
            dist = self.vae.encode(x).latent_dist
            out += list(zip(dist.mean.float(), dist.std.float()))
        return out


class PixelCache:
    """Decoded, square-cropped, resized images in memory (decoding a JPEG every step is wasteful)."""

    def __init__(self, size: int):
        self.size, self.items, self.masks, self.sizes = size, {}, {}, {}

    def get(self, path: Path) -> torch.Tensor:
        if path not in self.items:
            img = open_rgb(path)
            self.sizes[path] = img.size  # upright: what a mask must match
            self.items[path] = to_tensor(img, self.size)
        return self.items[path]

    def mask(self, item: ImageItem) -> torch.Tensor | None:
        """The photo's mask cropped and sized as the photo ([1, size, size]), or None when it has none."""
        if item.mask is None:
            return None
        if item.path not in self.masks:
            self.get(item.path)  # decoded once either way: the training needs the photo too
            self.masks[item.path] = mask_tensor(item.mask, self.sizes[item.path], self.size)
        return self.masks[item.path]


@dataclass
class LatentSource:
    """Where a run's latents come from: the pools cached before training (`pools[concept][image]`,
    `reg[concept][image]`), or, when they are empty, images encoded as they are drawn."""

    encode: Encoder
    pixels: PixelCache
    res: int
    factor: int
    device: torch.device
    aug: bool
    hflip: bool
    pools: list[list[list[Latent]]]
    reg: list[list[list[Latent]]]
    background: float = 1.0  # loss weight of a masked photo's background (TrainConfig.background_weight)

    def fresh_target(self, item: ImageItem, rng: random.Random) -> Latent:
        a = sample_augmentation(rng, self.res, aug=self.aug, hflip=self.hflip)
        (m, sd), = self.encode([apply_augmentation(self.pixels.get(item.path), a)])
        return Latent(m, sd, self.loss_mask(item, a), a.prefix)

    def loss_mask(self, item: ImageItem, a: Augmentation) -> torch.Tensor:
        """The method's mask (the pasted box), times the object weight where the photo has a mask."""
        mask = latent_mask(a, self.res, self.factor)
        obj = self.pixels.mask(item) if self.background < 1.0 else None
        if obj is not None:
            mask = mask * object_weight(obj, a, self.factor, self.background)
        return mask.to(self.device)

    def fresh_reg(self, path: Path, rng: random.Random) -> Latent:
        img = self.pixels.get(path)
        flip = self.hflip and rng.random() < 0.5
        (m, sd), = self.encode([img.flip(-1) if flip else img])
        return Latent(m, sd)


def cache_latents(concepts, source: LatentSource, pool_size: int, rng: random.Random, progress: Progress) -> None:
    """Fill `source.pools` with `pool_size` augmented latents of every target image and `source.reg` with
    every regularisation image (both flips when flipping), in encoder-sized batches."""
    res = source.res
    jobs = []  # (concept, image, augmentation)
    for ci, c in enumerate(concepts):
        for ii, _ in enumerate(c.images):
            for _ in range(pool_size):
                jobs.append((ci, ii, sample_augmentation(rng, res, aug=source.aug, hflip=source.hflip)))
    flips = (False, True) if source.hflip else (False,)
    reg_jobs = [(ci, j, flip) for ci, c in enumerate(concepts) for j in range(len(c.reg)) for flip in flips]
    source.pools = [[[] for _ in c.images] for c in concepts]
    source.reg = [[[] for _ in c.reg] for c in concepts]
    batch = source.encode.batch
    with progress.task("encoding latents", len(jobs) + len(reg_jobs)) as bar:
        for s in range(0, len(jobs), batch):
            chunk = jobs[s : s + batch]
            imgs = [apply_augmentation(source.pixels.get(concepts[ci].images[ii].path), a) for ci, ii, a in chunk]
            for (ci, ii, a), (m, sd) in zip(chunk, source.encode(imgs)):
                source.pools[ci][ii].append(Latent(m, sd, source.loss_mask(concepts[ci].images[ii], a), a.prefix))
            bar.advance(len(chunk))
        for s in range(0, len(reg_jobs), batch):
            chunk = reg_jobs[s : s + batch]
            imgs = []
            for ci, j, flip in chunk:
                img = source.pixels.get(concepts[ci].reg[j].path)
                imgs.append(img.flip(-1) if flip else img)
            for (ci, j, _), (m, sd) in zip(chunk, source.encode(imgs)):
                source.reg[ci][j].append(Latent(m, sd))
            bar.advance(len(chunk))
    source.pixels.items.clear()
    source.pixels.masks.clear()
    source.pixels.sizes.clear()
