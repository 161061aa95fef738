"""Training images: loading, aspect-preserving crops, Custom Diffusion's augmentation and loss mask.

The augmentation is split into a pure sampler (`sample_augmentation`) and pure appliers
(`apply_augmentation`, `latent_mask`) so the numbers are easy to test.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cdiff_cli.errors import CdiffError, NotFoundError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
FAR_PREFIXES = ("a far away ", "very small ")
NEAR_PREFIXES = ("zoomed in ", "close up ")


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str | None = None  # a per-image caption (real regularisation images), else None


def list_images(folder: str | Path, *, with_captions: bool = False) -> list[ImageItem]:
    """Images of a folder, sorted; with_captions reads `NAME.txt` beside each image if present."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotFoundError(f"image folder not found: {folder}")
    items = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_EXTS and p.is_file():
            cap = None
            side = p.with_suffix(".txt")
            if with_captions and side.is_file():
                cap = side.read_text(encoding="utf-8").strip() or None
            items.append(ImageItem(p, cap))
    if not items:
        raise CdiffError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) in {folder}")
    return items


def open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise CdiffError(f"cannot read image {path}: {e}") from e


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def center_square(img: Image.Image) -> Image.Image:
    """Centre-crop to a square so resizing never distorts a non-square photo."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Square-crop, resize to size x size, and scale to [-1, 1] as a [3, size, size] tensor."""
    img = center_square(img).resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class Augmentation:
    """One draw of the augmentation: image side `scale`, placed at (top, left); `flip` mirrors it."""

    scale: int
    top: int
    left: int
    flip: bool
    prefix: str


def sample_augmentation(rng: random.Random, size: int, *, aug: bool = True, hflip: bool = True) -> Augmentation:
    """Draw the method's augmentation for a target image of side `size`.

    With probability 2/3 the image shrinks to s ~ U[size/3, size] and is pasted on an empty canvas
    (top/left >= 0); otherwise it grows to s ~ U[1.2, 1.4] * size and is randomly cropped (top/left
    are then negative offsets into the enlarged image). Small results get "a far away"/"very small",
    enlarged ones "zoomed in"/"close up" in front of the caption.
    """
    flip = hflip and rng.random() < 0.5
    if not aug:
        return Augmentation(size, 0, 0, flip, "")
    if rng.random() < 2 / 3:
        scale = rng.randint(size // 3, size)
    else:
        scale = rng.randint(int(1.2 * size), int(1.4 * size))
    scale += scale % 2  # even sizes keep the paste box aligned
    if scale < size:
        top, left = rng.randint(0, size - scale), rng.randint(0, size - scale)
    else:
        top, left = -rng.randint(0, scale - size), -rng.randint(0, scale - size)
    if scale < 0.6 * size:
        prefix = rng.choice(FAR_PREFIXES)
    elif scale > size:
        prefix = rng.choice(NEAR_PREFIXES)
    else:
        prefix = ""
    return Augmentation(scale, top, left, flip, prefix)


def apply_augmentation(image: torch.Tensor, a: Augmentation) -> torch.Tensor:
    """Apply `a` to a [3, size, size] image in [-1, 1]; the canvas around a pasted image is 0."""
    size = image.shape[-1]
    if a.flip:
        image = image.flip(-1)
    if a.scale == size:
        return image
    resized = torch.nn.functional.interpolate(
        image[None], size=(a.scale, a.scale), mode="bicubic", align_corners=False, antialias=a.scale < size
    )[0].clamp(-1, 1)
    if a.scale < size:
        out = torch.zeros_like(image)
        out[:, a.top : a.top + a.scale, a.left : a.left + a.scale] = resized
        return out
    return resized[:, -a.top : -a.top + size, -a.left : -a.left + size].contiguous()


def latent_mask(a: Augmentation, size: int, factor: int) -> torch.Tensor:
    """Loss mask at latent resolution: the pasted box shrunk by one latent pixel, else all ones.

    Tiny boxes (possible on small test resolutions) keep their unshrunk box so the mask is never empty.
    """
    n = size // factor
    mask = torch.zeros(1, n, n)
    if a.scale >= size:
        mask[:] = 1.0
        return mask
    y0, y1 = a.top // factor, (a.top + a.scale) // factor
    x0, x1 = a.left // factor, (a.left + a.scale) // factor
    if y1 - y0 > 2 and x1 - x0 > 2:
        mask[:, y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] = 1.0
    else:
        mask[:, y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)] = 1.0
    return mask


def masked_mse_per_sample(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(mse * mask) / sum(mask) for each sample: [B]. mask: [B, 1, h, w]."""
    mse = (pred.float() - target.float()) ** 2
    mask = mask.expand_as(mse)
    return (mse * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp_min(1.0)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The method's masked loss: per-sample sum(mse * mask) / sum(mask), averaged over the batch."""
    return masked_mse_per_sample(pred, target, mask).mean()
