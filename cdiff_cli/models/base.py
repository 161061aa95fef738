"""Loading a base model: a hub id, a local diffusers folder, or a single-file checkpoint."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cdiff_cli.errors import CdiffError, Message, NotFoundError, first_line, option_error

DEFAULT_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SINGLE_FILE_EXTS = (".safetensors", ".ckpt")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_base() -> str:
    return os.environ.get("CDIFF_BASE") or DEFAULT_BASE


@dataclass(frozen=True)
class BaseSpec:
    """A base as the user named it, resolved: `ref` is an absolute path for local bases."""

    ref: str
    kind: str  # "hub", "folder" or "single_file"


def resolve_base(spec: str | None) -> BaseSpec:
    """`nano` is the small model shipped with cdiff (cdiff_cli/models/nano; a local folder of that name is
    `./nano`); else a local diffusers folder, a .safetensors/.ckpt file, or a hub id."""
    spec = spec or default_base()
    from cdiff_cli.models.packaged import BASE_NAMES, packaged_model

    if spec in BASE_NAMES:
        folder = packaged_model(BASE_NAMES[spec])
        if folder is None:
            raise NotFoundError(Message("the packaged {spec} model is not installed (no cdiff_cli/models/{folder}); train "
                                        "it with scripts/train_nano.py or pass {base} with another model", "base",
                                        spec=repr(spec), folder=BASE_NAMES[spec]), name=spec)
        return BaseSpec(str(folder.resolve()), "folder")
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise CdiffError(f"{p} is not a diffusers model folder (no model_index.json)")
        return BaseSpec(str(p.resolve()), "folder")
    if p.is_file():
        if p.suffix not in SINGLE_FILE_EXTS:
            raise CdiffError(f"{p}: a single-file base must be .safetensors or .ckpt")
        return BaseSpec(str(p.resolve()), "single_file")
    if p.suffix in SINGLE_FILE_EXTS or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise NotFoundError(f"base not found: {spec}")
    return BaseSpec(spec, "hub")


def quiet_libraries() -> None:
    """Silence the libraries' own loading bars and advice, process-wide: the CLI reports progress itself.

    The CLI calls this before a command that loads models (cdiff_cli.cli._app.command); the engine and the
    Python API never do, so a program that imports cdiff keeps its own logging and warning settings."""
    import warnings

    from diffusers.utils import logging as dlog
    from huggingface_hub.utils import logging as hlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    hlog.set_verbosity_error()  # e.g. "Retrying in 8s" while the hub does not answer
    if not os.environ.get("CDIFF_DEBUG"):
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"huggingface_hub\.")  # advice to diffusers


def pick_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise CdiffError(f"unknown device {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise option_error("{device} cuda was asked for but no CUDA GPU is available", "device")
    return dev


# A key only SDXL's original-layout checkpoints have: its second text encoder (OpenCLIP bigG).
SDXL_SINGLE_FILE_KEY = "conditioner.embedders.1."


def _single_file_keys(path: str) -> list[str]:
    """The tensor names of a single-file checkpoint, without reading the tensors where the format allows."""
    from safetensors import safe_open

    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # never run a pickle's code
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
    return [str(k) for k in sd] if isinstance(sd, dict) else []


def _pipeline_class(base: BaseSpec, local_files_only: bool = False):
    """StableDiffusionXLPipeline for an SDXL base (a folder's or hub id's model_index.json says so; a single
    file has SDXL's second text encoder), else StableDiffusionPipeline (SD 1.x / 2.x)."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if base.kind == "single_file":
        sdxl = any(k.startswith(SDXL_SINGLE_FILE_KEY) for k in _single_file_keys(base.ref))
        return StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    index = Path(base.ref) / "model_index.json"
    config = (json.loads(index.read_text(encoding="utf-8")) if index.is_file()
              else DiffusionPipeline.load_config(base.ref, local_files_only=local_files_only))
    name = str(config.get("_class_name", ""))
    return StableDiffusionXLPipeline if name.startswith("StableDiffusionXL") else StableDiffusionPipeline


def _network_failure(message: str) -> bool:
    low = message.lower()
    return any(w in low for w in ("offline", "connect", "outgoing traffic", "resolve host", "timed out"))


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub (HF_ENDPOINT) does not answer, in a few words; None when it answers or when
    offline mode (HF_HUB_OFFLINE=1) is on, where the libraries never ask it. Waits as long as the hub
    library waits for a file's metadata (HF_HUB_ETAG_TIMEOUT, 10 s by default)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if _hub_offline():
        return None
    try:  # any HTTP answer, even an error status, means the hub is there
        get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as e:
        return f"{constants.ENDPOINT}: {first_line(e)}"
    return None


def load_pipeline(spec: str | BaseSpec | None, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """Load a StableDiffusionPipeline (SD 1.x / 2.x) or StableDiffusionXLPipeline with the safety checker
    off and progress bars off."""
    from diffusers import StableDiffusionPipeline

    base = spec if isinstance(spec, BaseSpec) else resolve_base(spec)
    common = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
    # An unreachable hub would cost half a minute of retries before failing: ask once, and if it does not
    # answer use the local cache only.
    hub_down = hub_unreachable() if base.kind == "hub" else None
    try:
        cls = _pipeline_class(base, local_files_only=hub_down is not None)
        if cls is not StableDiffusionPipeline:
            common = dict(dtype=dtype)  # SDXL pipelines have no safety checker
        if base.kind == "single_file":
            # from_single_file needs the matching diffusers config; CDIFF_BASE_CONFIG may point at a local one.
            extra = {"config": os.environ["CDIFF_BASE_CONFIG"]} if os.environ.get("CDIFF_BASE_CONFIG") else {}
            pipe = cls.from_single_file(base.ref, **common, **extra)
        else:
            local = {"local_files_only": True} if hub_down else {}
            folder = base.ref if base.kind == "folder" else cls.download(base.ref, **local)  # what from_pretrained does first
            pipe = _load_folder(cls, Path(folder), common, torch.device(device))
    except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError... for a bad base
        if hub_down:
            raise CdiffError(Message("cannot load base model {ref}: the hub is unreachable ({why}) and the model is not "
                                     "in the local cache; pass {base} with a local folder or file", "base", ref=base.ref,
                                     why=hub_down), path=base.ref) from e
        first = first_line(e)
        hint = ""
        if base.kind == "hub" and _hub_offline():
            hint = " (offline mode, HF_HUB_OFFLINE=1: only the local cache is used; pass {base} with a local folder or file)"
        elif base.kind == "hub" and _network_failure(first):
            hint = " (the hub is unreachable: pass {base} with a local folder or file)"
        elif base.kind == "single_file" and not os.environ.get("CDIFF_BASE_CONFIG") and (_hub_offline() or _network_failure(first)):
            # diffusers fetches the configs of the model a single file holds from the hub
            hint = (" (a single file needs its model's diffusers configs from the hub: offline, set CDIFF_BASE_CONFIG "
                    "to a local diffusers folder of the same model)")
        raise CdiffError(Message("cannot load base model {ref}: {first}" + hint, *(("base",) if "{base}" in hint else ()),
                                 ref=base.ref, first=first), path=base.ref) from e
    pipe.set_progress_bar_config(disable=True)
    if not any(n.endswith("attn2.to_k.weight") for n, _ in pipe.unet.named_parameters()):
        raise CdiffError(f"base model {base.ref} has no cross-attention layers")
    return pipe.to(device)


WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _load_folder(cls, folder: Path, common: dict, device: torch.device):
    """A diffusers folder loaded without holding its weights twice (see cdiff_cli.models.loading): each model in
    the dtype its files hold (mapped, unread), then cast (or moved to a GPU) tensor by tensor from the files."""
    from cdiff_cli.models.loading import cast_from_files, stored_dtype

    dtype = common["dtype"]
    stored = {c: stored_dtype(folder / c) for c in WEIGHTED_COMPONENTS if (folder / c).is_dir()}
    stored = {c: d for c, d in stored.items() if d is not None}
    pipe = cls.from_pretrained(str(folder), **{**common, "dtype": {**stored, "default": dtype}})
    for c, d in stored.items():
        if d != dtype or device.type != "cpu":
            cast_from_files(getattr(pipe, c), folder / c, dtype, device)
    return pipe


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX): bf16 is then ~2x faster than fp32."""
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        flags = Path("/proc/cpuinfo").read_text(errors="ignore")
    except (OSError, AttributeError, RuntimeError):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 where the hardware has it (recent GPUs, AVX512-BF16/AMX CPUs), fp16 on older GPUs,
    else fp32. fp16 on a CPU is slow and poorly supported, so it falls back to fp32 there."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu" and cpu_has_fast_bf16():
            return "bf16"
        return "fp32"
    if device.type in ("cpu", "mps") and precision == "fp16":
        return "fp32"
    return precision


def default_resolution(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def load_base(base: str | None, device: str | None, precision: str = "fp32", *, in_cpu_memory: bool = False):
    """Load the base with its frozen weights in `precision` (already resolved, see resolve_precision),
    onto the device, or `in_cpu_memory` to wait there for the phases that run on the device."""
    spec = resolve_base(base)
    dev = pick_device(device)
    pipe = load_pipeline(spec, dtype=DTYPES[resolve_precision(precision, dev)], device="cpu" if in_cpu_memory else dev)
    return spec, pipe, dev
