"""Reading a file or folder from elsewhere: which format it is in, and its tensors (safetensors, or a pickle
opened only with `weights_only=True`, its expansion capped before it is read)."""

from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cdiff_cli.core.delta import FORMAT as CDIFF_FORMAT
from cdiff_cli.errors import CdiffError, first_line
from cdiff_cli.formats.names import CDIFF_FILE, LORA_MANIFEST, REFERENCE_FILE, WEIGHTS_BIN, WEIGHTS_SAFE


def _is_safetensors(path: Path) -> bool:
    # A safetensors file starts with an 8-byte little-endian header length and a JSON header. Sniff
    # instead of trusting the suffix: diffusers saves safetensors token files as `<token>.bin`.
    return _safetensors_problem(path) is None


def _safetensors_problem(path: Path) -> str | None:
    """Why `path` does not start like a safetensors file (None if it does). Every file an import reads is
    looked at here first: anything but a regular file (a FIFO would block the read forever) is refused."""
    if not path.is_file():
        raise CdiffError(f"{path} is not a regular file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if size == 0:
        return "the file is empty"
    if len(head) < 9 or head[8:9] != b"{":
        return "it does not start with a safetensors header"
    claimed = int.from_bytes(head[:8], "little")
    if claimed >= size:
        return f"its header claims {claimed} bytes but the whole file has {size}: truncated or damaged"
    return None


def _read_tensor_file(path: Path) -> dict:
    """Load a safetensors file or a pickle (weights_only) as a dict."""
    problem = _safetensors_problem(path)
    if problem is None:
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises several types for a corrupt file
            raise CdiffError(f"cannot read {path}: {first_line(e)}") from e
    _refuse_broken_safetensors(path, problem)
    _check_expansion(path)
    try:
        with warnings.catch_warnings():  # e.g. torch's note on the pickle protocol: not for our users
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for forbidden objects, others for corrupt files
        raise CdiffError(
            f"{path} is not a plain tensor file ({_pickle_refusal(e)}); cdiff loads pickles only with weights_only=True"
        ) from e
    if not isinstance(obj, dict):
        raise CdiffError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    return obj


# What a pickled (torch.save) file may expand to in memory. A zip member can inflate a thousandfold: an
# 8 MB file that inflates to 8 GiB used to be killed by the OOM killer without a word. The largest real
# delta, SDXL's whole cross-attention (q, k, v, out) in fp32, holds about 2 GB.
MAX_EXPANDED_BYTES = 3 * 2**30


def _check_expansion(path: Path) -> None:
    """Refuse a torch.save file whose members would take more than MAX_EXPANDED_BYTES once read (a legacy,
    non-zip pickle is not compressed: its size on disk bounds it)."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            total = sum(max(0, i.file_size) for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CdiffError(f"{path} is not a readable torch.save file: {first_line(e)}") from e
    if total > MAX_EXPANDED_BYTES:
        raise CdiffError(f"{path} would expand to {total / 2**30:.1f} GiB in memory, more than any delta "
                         f"({MAX_EXPANDED_BYTES / 2**30:.0f} GiB): refused")


def _refuse_broken_safetensors(path: Path, problem: str) -> None:
    """A file that says it is safetensors (by its name, or by starting with a JSON header) but is not a valid
    one gets that said, rather than being tried as a pickle."""
    with open(path, "rb") as f:
        starts_like_one = f.read(9)[8:9] == b"{"
    if path.suffix == ".safetensors" or starts_like_one:
        raise CdiffError(f"{path} is not a valid safetensors file: {problem}")


def _pickle_refusal(e: Exception) -> str:
    # torch's message is long and suggests weights_only=False; keep only what the file contained.
    # torch words it "Unsupported global: GLOBAL io.open" or "unsupported GLOBAL posix.system whose module ...".
    if m := re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", str(e), re.IGNORECASE):
        return f"it refers to {m.group(1)}, which is not a tensor type"
    return "it is not a readable torch.save file"


def _safetensors_metadata(path: Path) -> tuple[dict, list[str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, list(f.keys())
    except Exception as e:
        raise CdiffError(f"cannot read {path}: {first_line(e)}") from e


def _single_token_error(path: Path) -> CdiffError:
    return CdiffError(f"{path} is a single token embedding: pass the folder that also holds the Custom Diffusion weights")


def _classify(path: Path, obj: dict) -> str:
    """Which format a loaded dict is in."""
    if "state_dict" in obj:
        return "reference-ckpt"
    if "unet" in obj or "modifier_token" in obj:
        return "reference"
    if any(isinstance(k, str) and "custom_diffusion" in k for k in obj):
        return "diffusers"
    if len(obj) == 1 and isinstance(next(iter(obj.values())), torch.Tensor):
        raise _single_token_error(path)
    raise CdiffError(f"{path}: unknown layout (not a cdiff, diffusers or reference Custom Diffusion delta)")


def _sniff_file(path: Path) -> tuple[str, dict | None]:
    """(format, loaded dict) for a file; the dict is None for cdiff files, which Delta.load reads."""
    problem = _safetensors_problem(path)
    if problem is None:
        meta, keys = _safetensors_metadata(path)
        if meta.get("format") == CDIFF_FORMAT:
            return "cdiff", None
        if any("custom_diffusion" in k for k in keys):
            return "diffusers", _read_tensor_file(path)
        if any(k.endswith(".lora_down.weight") for k in keys):
            return "lora", None
        if len(keys) == 1:
            raise _single_token_error(path)
        raise CdiffError(f"{path}: unknown layout (a safetensors file that is neither a cdiff delta nor Custom Diffusion weights)")
    _refuse_broken_safetensors(path, problem)
    obj = _read_tensor_file(path)
    return _classify(path, obj), obj


def _main_file(folder: Path) -> Path:
    """The file that identifies a folder's format."""
    for name in (CDIFF_FILE, WEIGHTS_SAFE, WEIGHTS_BIN, REFERENCE_FILE):
        if (folder / name).is_file():
            return folder / name
    ckpts = sorted(folder.glob("delta*.ckpt"))
    if len(ckpts) == 1:
        return ckpts[0]
    if len(ckpts) > 1:
        names = ", ".join(p.name for p in ckpts)
        raise CdiffError(f"{folder} holds several checkpoints ({names}): pass one of them")
    raise CdiffError(
        f"{folder}: unknown folder layout: expected {CDIFF_FILE} (cdiff), {WEIGHTS_SAFE} or {WEIGHTS_BIN} "
        f"(diffusers), {REFERENCE_FILE} or delta*.ckpt (reference)"
    )


def _locate(path) -> tuple[str, Path, dict | None]:
    p = Path(path)
    if not p.exists():
        raise CdiffError(f"{p}: no such file or folder")
    if p.is_dir() and (p / LORA_MANIFEST).is_file():
        return "lora", p, None
    file = _main_file(p) if p.is_dir() else p
    fmt, obj = _sniff_file(file)
    return fmt, file, obj


def detect_format(path) -> str:
    """One of FORMATS for a delta file or folder; CdiffError if it is none of them."""
    return _locate(path)[0]


