"""Training images: loading, aspect-preserving crops, Custom Diffusion's augmentation and loss mask.

The augmentation is split into a pure sampler (`sample_augmentation`) and pure appliers
(`apply_augmentation`, `latent_mask`) so the numbers are easy to test.
"""

from __future__ import annotations

import io
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cdiff_cli.errors import CdiffError, NotFoundError
from cdiff_cli.hashing import file_sha256

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MIN_SIDE = 32  # shorter image side, in pixels, below which a photo carries too little to learn from
FAR_PREFIXES = ("a far away ", "very small ")
NEAR_PREFIXES = ("zoomed in ", "close up ")
_IGNORED_PREFIX = "._"  # macOS AppleDouble side files ("._IMG_1.jpg"): metadata, never an image
# Decoders open_rgb will use, whatever the extension says (a PNG saved as .jpg is fine). Leaving out the
# rest keeps odd decoders (EPS runs Ghostscript) away from files downloaded from anywhere. MPO opens as JPEG.
_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_NEEDS_CONVERTING = {".heic", ".heif", ".avif", ".jxl", ".svg", ".psd", ".raw", ".cr2", ".nef", ".dng", ".arw"}


MASK_SUFFIX = ".mask.png"  # "cat1.mask.png" beside "cat1.jpg": white where the concept is, black elsewhere


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str | None = None  # a per-image caption (real regularisation images), else None
    mask: Path | None = None  # where the concept is in the photo (`MASK_SUFFIX`), else None


def is_mask(path: Path) -> bool:
    return path.name.lower().endswith(MASK_SUFFIX)


def mask_path(image: Path) -> Path:
    return image.with_name(image.stem + MASK_SUFFIX)


def list_images(folder: str | Path, *, with_captions: bool = False, with_masks: bool = False) -> list[ImageItem]:
    """Images of a folder, sorted; with_captions reads `NAME.txt` beside each image if present, with_masks
    notes `NAME.mask.png`. Mask files are never images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotFoundError(f"image folder not found: {folder}")
    items = []
    skipped: list[Path] = []
    for p in sorted(folder.iterdir()):
        if is_mask(p):
            continue
        if p.suffix.lower() in IMAGE_EXTS and p.is_file() and not p.name.startswith(_IGNORED_PREFIX):
            cap = None
            side = p.with_suffix(".txt")
            if with_captions and side.is_file():
                try:
                    cap = side.read_text(encoding="utf-8").strip() or None
                except (OSError, UnicodeDecodeError) as e:
                    raise CdiffError(f"cannot read the caption {side}: {e}; save it as UTF-8 text") from e
            mask = mask_path(p) if with_masks and mask_path(p).is_file() else None
            items.append(ImageItem(p, cap, mask))
        else:
            skipped.append(p)
    if not items:
        raise CdiffError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) in {folder}{_skipped_note(skipped)}")
    return items


def _skipped_note(skipped: list[Path]) -> str:
    """' (skipped 2 other files: a.txt, b.heic; ...)' for the no-images message, '' when the folder is empty."""
    files = [p for p in skipped if not p.is_dir()]
    dirs = [p for p in skipped if p.is_dir()]
    parts = []
    if files:
        names = ", ".join(p.name for p in files[:3]) + (", ..." if len(files) > 3 else "")
        parts.append(f"skipped {len(files)} other file{'s' * (len(files) != 1)}: {names}")
    if dirs:
        parts.append(f"{len(dirs)} sub-folder{'s' * (len(dirs) != 1)} not searched: images must be directly in the folder")
    if any(p.suffix.lower() in _NEEDS_CONVERTING for p in files):
        parts.append("convert HEIC/RAW/other photos to JPEG or PNG first")
    return f" ({'; '.join(parts)})" if parts else ""


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bomb_message(path: Path, e: BaseException) -> str:
    """Pillow only reports the pixel count of an over-large image (in its message); say it in megapixels."""
    found = re.search(r"\d+", str(e))
    size = f"{int(found.group()) / 1e6:.0f} megapixels" if found else "too many pixels"
    limit = f", over the safety limit of {Image.MAX_IMAGE_PIXELS / 1e6:.0f}" if Image.MAX_IMAGE_PIXELS else ""
    return (
        f"{path} is too large to load safely ({size}{limit}): "
        "downscale it (2048 px on the longer side is plenty) and try again"
    )


def open_rgb(path: Path) -> Image.Image:
    """Decode one image fully to 8-bit RGB, upright, alpha flattened onto white.

    Raises CdiffError (one line naming the file) for anything that is not a usable photo: not an image,
    truncated or corrupt, animated or multi-page, smaller than MIN_SIDE, or past Pillow's
    decompression-bomb limit; NotFoundError if the file does not exist.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Pillow warns (and only refuses at twice the limit) for images past MAX_IMAGE_PIXELS.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Pillow's notes on damaged metadata ("Corrupt EXIF data") would clutter the CLI's one-line output.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            with Image.open(path, formats=_FORMATS) as im:
                frames = getattr(im, "n_frames", 1)
                # MPO (many phone/camera JPEGs) stores a preview or depth map after the main photo: use frame 0.
                if frames > 1 and im.format != "MPO":
                    kind = "pages" if im.format == "TIFF" else "frames"
                    raise CdiffError(
                        f"{path} is animated or multi-page ({frames} {kind}): save the one frame you want as PNG or JPEG"
                    )
                if min(im.size) < MIN_SIDE:
                    w, h = im.size
                    raise CdiffError(
                        f"{path} is only {w}x{h} px: training images need at least {MIN_SIDE} px on the shorter side"
                    )
                im.load()  # the full decode: truncated files only fail here
                return _to_rgb(_upright(im))
    except CdiffError:
        raise
    except FileNotFoundError as e:
        raise NotFoundError(f"image not found: {path}") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CdiffError(_bomb_message(path, e)) from e
    except UnidentifiedImageError as e:
        raise CdiffError(f"{path} is not an image Pillow can read: remove it or re-save it as PNG or JPEG") from e
    except IsADirectoryError as e:
        raise CdiffError(f"{path} is a folder, not an image") from e
    except PermissionError as e:
        raise CdiffError(f"cannot read {path}: permission denied") from e
    except Exception as e:  # noqa: BLE001 - decoders raise many types (OSError, SyntaxError, ValueError...) on bad data
        raise CdiffError(
            f"{path} is truncated or corrupt ({_one_line(e)}): re-export or re-download it, or remove it"
        ) from e


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phones store portrait photos sideways plus a rotation tag)."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a malformed EXIF block should not cost a photo whose pixels are fine
        return im


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(im)
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    if _has_alpha(im):
        # Flatten onto white rather than dropping alpha: fully transparent pixels often hold black or
        # leftover colours that are invisible in a viewer but would be trained on as part of the photo.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _has_alpha(im: Image.Image) -> bool:
    """Image.has_transparency_data, which Pillow < 10.1 lacks."""
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        return True
    return im.mode == "P" and im.palette is not None and im.palette.mode.endswith("A")


def _high_depth_to_rgb(im: Image.Image) -> Image.Image:
    """16-bit (I;16*), 32-bit integer (I) and float (F) greyscale to 8 bit by scaling, not clipping.

    `convert("RGB")` clips every value above 255 to white. I;16* and I hold 0..65535 (16-bit PNG/TIFF);
    I values beyond that are scaled by their maximum. F in 0..1 is scaled by 255, other F ranges like I.
    """
    arr = np.asarray(im).astype(np.float32)  # one working copy, changed in place (big scans stay affordable)
    np.nan_to_num(arr, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    if im.mode == "F" and arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
        arr *= 255.0
    else:
        top = float(arr.max()) if arr.size else 0.0
        arr *= 255.0 / (top if top > 65535 else 65535)
    np.rint(arr, out=arr)
    np.clip(arr, 0, 255, out=arr)
    grey = Image.fromarray(arr.astype(np.uint8))  # uint8 2-D: mode L
    return grey.convert("RGB")


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    """CMYK through its embedded ICC profile when there is one (print files), else Pillow's formula."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            out = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            if out is not None:
                return out
        except Exception:  # noqa: BLE001 - a broken profile or no littlecms: fall back to the plain formula
            pass
    return im.convert("RGB")


def check_images(items: list[ImageItem]) -> dict[Path, str]:
    """Decode every image and refuse exact duplicates, so a bad file is reported before a model loads.
    Returns each item's sha256 (for the run id and the manifest: every photo is hashed once per run)."""
    seen: dict[str, Path] = {}
    digests: dict[Path, str] = {}
    done: dict[Path, str] = {}  # resolved path -> digest: the same file listed twice is not a copy
    for item in items:
        path = Path(item.path)
        key = path.resolve()
        if key in done:
            digests[item.path] = done[key]
            continue
        with open_rgb(path) as im:
            size = im.size
        try:
            digest = file_sha256(path)
        except OSError as e:
            raise CdiffError(f"cannot read {path}: {_one_line(e)}") from e
        done[key] = digests[item.path] = digest
        first = seen.setdefault(digest, path)
        if first != path:
            a, b = (first.name, path.name) if first.parent == path.parent else (str(first), str(path))
            raise CdiffError(f"{b} is a copy of {a}: remove one (duplicates weight training towards one photo)")
        if item.mask is not None:
            read_mask(item.mask, size)
            try:
                digests[item.mask] = file_sha256(item.mask)
            except OSError as e:
                raise CdiffError(f"cannot read {item.mask}: {_one_line(e)}") from e
    return digests


def read_mask(path: Path, size: tuple[int, int]) -> Image.Image:
    """A photo's mask as a two-level 'L' image (255 where the concept is), upright like the photo. Refuses (one
    line naming the file) a mask that is not an image, is not the photo's size, or marks nothing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=_FORMATS) as im:
                im.load()
                mask = _upright(im).convert("L")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CdiffError(_bomb_message(path, e)) from e
    except Exception as e:  # noqa: BLE001 - as open_rgb: any decoder error is a bad file
        raise CdiffError(f"the mask {path} cannot be read as an image ({_one_line(e)}): save it as a black and white PNG") from e
    if mask.size != size:
        raise CdiffError(f"the mask {path} is {mask.size[0]}x{mask.size[1]} px but its photo is {size[0]}x{size[1]}: "
                         "a mask must have its photo's size")
    mask = mask.point(lambda v: 255 if v >= 128 else 0)
    if mask.getbbox() is None:
        raise CdiffError(f"the mask {path} marks nothing: make it white where the concept is, black elsewhere")
    return mask


def mask_tensor(path: Path, photo_size: tuple[int, int], size: int) -> torch.Tensor:
    """`read_mask` square-cropped and resized as `to_tensor` does its photo: [1, size, size], 1 on the concept."""
    m = center_square(read_mask(path, photo_size)).resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy((np.asarray(m, dtype=np.float32) >= 128).astype(np.float32))[None]




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


def object_weight(mask: torch.Tensor, a: Augmentation, factor: int, background: float) -> torch.Tensor:
    """Loss weight at latent resolution for a photo with a mask ([1, size, size], 1 on the concept), under the
    augmentation `a`: 1 on every latent pixel the concept touches and one pixel around it, `background` elsewhere.
    The ring keeps the concept's edges in the loss; the low weight keeps the photos' backgrounds out of the token
    (on nano, a token trained on a photo on green drew green stripes into the concept on other backgrounds)."""
    m = apply_augmentation(mask, a)[None]
    m = torch.nn.functional.max_pool2d((m > 0.5).float(), factor)
    m = torch.nn.functional.max_pool2d(m, 3, stride=1, padding=1)[0]
    return background + (1.0 - background) * m


def masked_mse_per_sample(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(mse * mask) / sum(mask) for each sample: [B]. mask: [B, 1, h, w]."""
    mse = (pred.float() - target.float()) ** 2
    mask = mask.expand_as(mse)
    return (mse * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp_min(1.0)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The method's masked loss: per-sample sum(mse * mask) / sum(mask), averaged over the batch."""
    return masked_mse_per_sample(pred, target, mask).mean()
