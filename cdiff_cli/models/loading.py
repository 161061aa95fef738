"""Loading a base's weights in another precision without a memory spike.

diffusers' `from_pretrained(dtype=bf16)` of an fp32 folder maps each safetensors file and casts tensor by
tensor; every page it reads stays resident (and counts in the process's RSS) until the whole file is
unmapped at the end. Measured on the full-size SD 1.x layout saved in fp32, the process peaked at 5.3 GB
to hold 2.4 GB of bf16 weights: the whole fp32 UNet (3.4 GB) was resident beside its bf16 copy, a higher
peak than training itself (2.5-2.9 GB at 256 px, batch 2).

So a diffusers folder is loaded in the dtypes its files hold (nothing is cast: the weights stay mapped
and unread), then each tensor is read from its file with plain reads into a buffer of its own, converted,
and put in place of the mapped one (`cast_from_files`); at any time one tensor exists in the file's dtype.
safetensors has no API that reads one tensor without mapping the file, hence the small reader below
(its format is a little-endian u64 header length, a JSON header, then the raw tensors).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
MAX_HEADER = 100 * 2**20  # safetensors' own limit


class UnreadableTensors(ValueError):
    """A safetensors file whose header does not describe its contents."""


@dataclass(frozen=True)
class StoredTensor:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset in the file
    nbytes: int


def parse_header(raw: bytes, data_start: int, file_size: int) -> dict[str, StoredTensor]:
    """The tensors a safetensors header describes, each checked to lie inside the file and to have the
    size its dtype and shape say."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnreadableTensors(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise UnreadableTensors("the header is not a JSON object")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise UnreadableTensors(f"tensor {name!r}: bad header entry ({e})") from None
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != size or data_start + end > file_size:
            raise UnreadableTensors(f"tensor {name!r}: its offsets do not match its shape or lie outside the file")
        out[name] = StoredTensor(dtype, shape, data_start + begin, end - begin)
    return out


def read_index(path: str | Path) -> dict[str, StoredTensor]:
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UnreadableTensors(f"{path} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise UnreadableTensors(f"{path}: header length {n} is impossible")
        return parse_header(f.read(n), 8 + n, size)


def read_tensor(f, t: StoredTensor) -> torch.Tensor:
    """One tensor, read (not mapped) from the open file `f` into memory of its own."""
    out = torch.empty(t.shape, dtype=t.dtype)
    if t.nbytes:
        f.seek(t.start)
        if f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy())) != t.nbytes:
            raise UnreadableTensors(f"{f.name} ends before its tensors do")
    return out


def weight_files(folder: Path) -> list[Path]:
    """A component folder's safetensors files as `from_pretrained` reads them without a variant: the plain
    file or its shards (`model-00001-of-00002.safetensors`), never a variant (`model.fp16.safetensors`)."""
    return sorted(p for p in folder.glob("*.safetensors") if p.name.count(".") == 1)


def stored_dtype(folder: Path) -> torch.dtype | None:
    """The floating dtype of a component folder's weights (None: no safetensors file, or mixed dtypes)."""
    files = weight_files(folder)
    try:
        kinds = {t.dtype for f in files for t in read_index(f).values() if t.dtype.is_floating_point}
    except (OSError, UnreadableTensors):
        return None
    return kinds.pop() if len(kinds) == 1 else None


def _kept_fp32(module: torch.nn.Module, name: str) -> bool:
    """Parameters a model asks to keep in fp32 whatever the load dtype (diffusers' and transformers' flag)."""
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    return any(k in name.split(".") for k in keep)


def cast_from_files(module: torch.nn.Module, folder: Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> int:
    """Give every floating tensor of `module` the `dtype` (on `device`), reading each one found in the
    folder's safetensors files from the file; the others (none in a folder saved by diffusers or
    transformers) are converted from memory. Returns how many tensors were read from the files."""
    index: dict[str, tuple[Path, StoredTensor]] = {}
    for path in weight_files(folder):
        index.update({k: (path, t) for k, t in read_index(path).items()})
    done: dict[int, torch.Tensor] = {}  # tied tensors stay tied
    files, read = {}, 0
    try:
        for owner, kind, name, full in _floating_tensors(module):
            old = getattr(owner, name)
            key = old.data_ptr() if old.numel() else id(old)
            if key not in done:
                want = torch.float32 if _kept_fp32(module, full) else dtype
                src = index.get(full)
                if src is not None and src[1].shape == tuple(old.shape):
                    path, t = src
                    f = files.get(path) or files.setdefault(path, open(path, "rb"))
                    done[key] = read_tensor(f, t).to(device, want)
                    read += 1
                else:
                    done[key] = old.detach().to(device, want)
            if kind == "param":
                owner._parameters[name].data = done[key]
            else:
                owner._buffers[name] = done[key]
    finally:
        for f in files.values():
            f.close()
    return read


def _floating_tensors(module: torch.nn.Module):
    """(owning module, "param" or "buffer", local name, full name) of each floating tensor."""
    for mod_name, mod in module.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for n, p in list(mod._parameters.items()):
            if p is not None and p.is_floating_point():
                yield mod, "param", n, prefix + n
        for n, b in list(mod._buffers.items()):
            if b is not None and b.is_floating_point():
                yield mod, "buffer", n, prefix + n
