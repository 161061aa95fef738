"""Import and export of concept deltas in the layouts of other Custom Diffusion tools.

Formats (names as `detect_format` returns them):

- "cdiff": cdiff's own `delta.safetensors` (see `cdiff_cli.delta`).
- "diffusers": the output folder of diffusers' `train_custom_diffusion.py` (and of
  `export_diffusers`): `pytorch_custom_diffusion_weights.safetensors` (or `.bin`) holding the
  Custom Diffusion attention-processor weights, plus one `<token>.safetensors` / `<token>.bin` per
  token holding `{token: embedding}`.
- "reference": the `delta.bin` of adobe-research/custom-diffusion's diffusers scripts,
  `{"unet": {diffusers param name: tensor}, "modifier_token": {token: embedding}}`.
- "reference-ckpt": the CompVis `delta_epoch=*.ckpt` of the same repository,
  `{"state_dict": {LDM param name: tensor, "embed": [n_new, dim]}}`.
- "lora": a kohya-style LoRA of cross-attention k/v (see `cdiff_cli.lora`): cdiff's LoRA export folder,
  or a bare LoRA file with its token embeddings given separately (textual-inversion files).

All but "lora" store full fine-tuned weights (not differences), so importing is a renaming job; a LoRA
holds W - W0 and needs the base model's weights.
Pickled files are only ever opened with `torch.load(..., weights_only=True)`: a delta downloaded
from somewhere must not be able to run code.
"""

from __future__ import annotations

import json
import math
import re
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cdiff_cli.delta import FORMAT as CDIFF_FORMAT
from cdiff_cli.delta import Delta
from cdiff_cli.errors import CdiffError, first_line
from cdiff_cli.files import save_tensors

FORMATS = ("cdiff", "diffusers", "reference", "reference-ckpt", "lora")

CDIFF_FILE = "delta.safetensors"
WEIGHTS_SAFE = "pytorch_custom_diffusion_weights.safetensors"  # diffusers' CUSTOM_DIFFUSION_WEIGHT_NAME_SAFE
WEIGHTS_BIN = "pytorch_custom_diffusion_weights.bin"  # diffusers' CUSTOM_DIFFUSION_WEIGHT_NAME
EXPORT_MANIFEST = "cdiff_export.json"
REFERENCE_FILE = "delta.bin"
LORA_MANIFEST = "cdiff_lora.json"  # which token each embedding file of a LoRA export is (cdiff_cli.lora)
BASE_FILE = "cdiff_base.json"  # beside every export: the base it was made on, for `cdiff add` without --base
_BASE_FILE_LIMIT = 1 << 20  # bytes: a base record is a few hundred; anything larger is not one
LDM_PREFIX = "model.diffusion_model."
CKPT_EMBED_KEY = "embed"
SDXL_EMBED_KEYS = ("clip_l", "clip_g")  # an SDXL token file: first and second text encoder
WEBUI_EMBED_KEY = "emb_params"  # the webui's single-vector embedding file; it names the token by the file

# Attention parameter (relative to `...attn2.`) -> key inside diffusers' CustomDiffusionAttnProcessor.
# The processor's state dict is saved under `<attention module>.processor.<key>`.
_PROCESSOR_KEYS = {
    "to_k.weight": "to_k_custom_diffusion.weight",
    "to_v.weight": "to_v_custom_diffusion.weight",
    "to_q.weight": "to_q_custom_diffusion.weight",
    "to_out.0.weight": "to_out_custom_diffusion.0.weight",
    "to_out.0.bias": "to_out_custom_diffusion.0.bias",
}
_PARAM_KEYS = {v: k for k, v in _PROCESSOR_KEYS.items()}
_KV_SUFFIXES = ("to_k.weight", "to_v.weight")
_QOUT_SUFFIXES = ("to_q.weight", "to_out.0.weight", "to_out.0.bias")


# --------------------------------------------------------------------------- name mappings


def to_processor_key(name: str) -> str:
    """`X.attn2.to_k.weight` -> `X.attn2.processor.to_k_custom_diffusion.weight` (diffusers' layout)."""
    for suffix, key in _PROCESSOR_KEYS.items():
        if name.endswith("." + suffix):
            return f"{name[: -len(suffix)]}processor.{key}"
    raise CdiffError(f"{name} is not a parameter a Custom Diffusion processor can hold")


def from_processor_key(key: str) -> str:
    """Inverse of `to_processor_key`."""
    module, sep, sub = key.rpartition(".processor.")
    if not sep or sub not in _PARAM_KEYS:
        raise CdiffError(f"{key} is not a Custom Diffusion processor weight")
    return f"{module}.{_PARAM_KEYS[sub]}"


# LDM (CompVis) UNet: input_blocks[0] is conv_in, then each level has L (resnet, transformer) blocks
# and one downsample; output_blocks have L+1 blocks per level. The transformer is sub-module 1.
_LDM_IN = re.compile(r"input_blocks\.(\d+)\.1\.(transformer_blocks\.\d+\..+)")
_LDM_MID = re.compile(r"middle_block\.1\.(transformer_blocks\.\d+\..+)")
_LDM_OUT = re.compile(r"output_blocks\.(\d+)\.1\.(transformer_blocks\.\d+\..+)")
_DIF_DOWN = re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(transformer_blocks\.\d+\..+)")
_DIF_MID = re.compile(r"mid_block\.attentions\.0\.(transformer_blocks\.\d+\..+)")
_DIF_UP = re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(transformer_blocks\.\d+\..+)")


def ldm_to_diffusers(name: str, layers_per_block: int = 2) -> str:
    """Map an LDM transformer-block parameter name (with or without `model.diffusion_model.`) to diffusers'."""
    short = name[len(LDM_PREFIX) :] if name.startswith(LDM_PREFIX) else name
    per_level = layers_per_block + 1
    if m := _LDM_IN.fullmatch(short):
        n, rest = int(m.group(1)), m.group(2)
        if n >= 1:
            level, j = divmod(n - 1, per_level)
            if j < layers_per_block:  # j == L is the downsample block, which has no attention
                return f"down_blocks.{level}.attentions.{j}.{rest}"
    elif m := _LDM_MID.fullmatch(short):
        return f"mid_block.attentions.0.{m.group(1)}"
    elif m := _LDM_OUT.fullmatch(short):
        level, j = divmod(int(m.group(1)), per_level)
        return f"up_blocks.{level}.attentions.{j}.{m.group(2)}"
    raise CdiffError(f"{name} is not a transformer-block parameter of an LDM UNet")


def diffusers_to_ldm(name: str, layers_per_block: int = 2) -> str:
    """Map a diffusers transformer-block parameter name to the LDM name (with `model.diffusion_model.`)."""
    per_level = layers_per_block + 1
    if m := _DIF_DOWN.fullmatch(name):
        level, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        if j < layers_per_block:
            return f"{LDM_PREFIX}input_blocks.{1 + level * per_level + j}.1.{rest}"
    elif m := _DIF_MID.fullmatch(name):
        return f"{LDM_PREFIX}middle_block.1.{m.group(1)}"
    elif m := _DIF_UP.fullmatch(name):
        level, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        if j < per_level:
            return f"{LDM_PREFIX}output_blocks.{level * per_level + j}.1.{rest}"
    raise CdiffError(
        f"{name} is not a transformer-block parameter of a diffusers UNet with {layers_per_block} layers per block"
    )


def _layers_per_block(unet) -> int:
    lpb = unet.config.layers_per_block
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise CdiffError("LDM checkpoints cannot be mapped onto a UNet with a different layers_per_block per level")
        lpb = lpb[0]
    return int(lpb)


# --------------------------------------------------------------------------- reading files


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


# --------------------------------------------------------------------------- importing


def _as_weight(path: Path, name, value) -> torch.Tensor:
    if isinstance(value, dict) and {"u", "v"} & set(value):
        raise CdiffError(f"{path}: compressed reference deltas are not supported ({name} is stored as u/v factors)")
    if not isinstance(value, torch.Tensor):
        raise CdiffError(f"{path}: entry {name} is a {type(value).__name__}, not a tensor")
    return value.detach().to(torch.float32)


def _as_embedding(path: Path, token, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not (value.ndim == 1 or (value.ndim == 2 and value.shape[0] == 1)):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise CdiffError(f"{path}: token {token} does not hold one embedding vector (found {shape})")
    return value.detach().reshape(-1).to(torch.float32)


def _as_embeddings(path: Path, token, value) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token's rows: a vector (SD 1.x/2.x), or a pair (SDXL: the reference SDXL script's list of two,
    one per text encoder)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise CdiffError(f"{path}: token {token} has {len(value)} embeddings; expected one, or two for SDXL")
        return _as_embedding(path, token, value[0]), _as_embedding(path, token, value[1])
    return _as_embedding(path, token, value), None


def _stack(path: Path, vectors: list[torch.Tensor]) -> torch.Tensor:
    if len({v.shape[0] for v in vectors}) != 1:
        raise CdiffError(f"{path}: the token embeddings have different widths")
    return torch.stack(vectors)


def _stack_pairs(path: Path, pairs: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack (first encoder, second encoder or None) rows; all tokens must agree on SDXL or not."""
    seconds = [b for _, b in pairs if b is not None]
    if seconds and len(seconds) != len(pairs):
        raise CdiffError(f"{path}: some tokens have SDXL's two embeddings and some one")
    return _stack(path, [a for a, _ in pairs]), (_stack(path, seconds) if seconds else None)


def _natural_key(p: Path):
    # <new2> before <new10>
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p.name)]


def _inside(folder: Path, name, manifest: Path) -> Path:
    """`folder / name` for a file name read from a manifest in `folder`: a plain relative path that stays inside
    the folder (no `..`, no absolute path, no link leading out) and names a regular file."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CdiffError(f"{manifest} names {name!r}: only files inside its own folder are read")
    path = folder / name
    root = folder.resolve()
    if root not in path.resolve().parents:
        raise CdiffError(f"{manifest} names {name!r}, which leads out of its folder: only files inside it are read")
    if not path.is_file():
        raise CdiffError(f"{manifest} names {name!r}, which is not a regular file in {folder}")
    return path


def _token_files(folder: Path, weights_file: Path) -> list[Path]:
    """Token files beside the weights, in the manifest's order if we exported them."""
    manifest = folder / EXPORT_MANIFEST
    if manifest.is_file():
        try:
            entries = json.loads(manifest.read_text(encoding="utf-8"))["tokens"]
            names = [e["file"] for e in entries]
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise CdiffError(f"{manifest} is not a valid cdiff export manifest: {first_line(e)}") from e
        return [_inside(folder, n, manifest) for n in names]
    skip = {weights_file.name, WEIGHTS_SAFE, WEIGHTS_BIN, CDIFF_FILE, REFERENCE_FILE}
    files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.name not in skip and p.is_file()]
    return sorted(files, key=_natural_key)


def _read_token_file(file: Path) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """(token, embedding, SDXL second-encoder embedding or None) of a textual-inversion file."""
    if not file.is_file():
        raise CdiffError(f"{file}: token file is missing")
    d = _read_tensor_file(file)
    if isinstance(d.get("string_to_param"), dict) and "*" in d["string_to_param"]:  # the webui's .pt embeddings
        return str(d.get("name") or file.stem), _as_embedding(file, file.stem, d["string_to_param"]["*"]), None
    if set(d) == set(SDXL_EMBED_KEYS):  # the SDXL layout the webui, ComfyUI and diffusers' docs use
        token = _safetensors_metadata(file)[0].get("cdiff_token") if _is_safetensors(file) else None
        # The webui names such a token by its file name; cdiff's exports record the token.
        return str(token or f"<{file.stem}>"), *(_as_embedding(file, file.stem, d[k]) for k in SDXL_EMBED_KEYS)
    if len(d) != 1:
        raise CdiffError(f"{file}: a token file must hold exactly one {{token: embedding}} entry, found {len(d)}")
    token, value = next(iter(d.items()))
    return str(token), _as_embedding(file, token, value), None


def _load_diffusers(file: Path, state: dict) -> Delta:
    weights = {}
    for key, value in state.items():
        if isinstance(value, dict) and not value:
            continue  # diffusers' .bin keeps an empty entry for every untrained (attn1) processor
        try:
            name = from_processor_key(key)
        except CdiffError as e:
            raise CdiffError(f"{file}: {e}") from e
        weights[name] = _as_weight(file, key, value)
    read = [_read_token_file(f) for f in _token_files(file.parent, file)]
    if not read:
        raise CdiffError(f"{file.parent}: no token embedding found (expected <token>.safetensors or <token>.bin files)")
    return _make_delta(file, weights, [t for t, _, _ in read], *_stack_pairs(file, [(a, b) for _, a, b in read]))


def _load_reference(file: Path, obj: dict) -> Delta:
    if "text_encoder" in obj:
        raise CdiffError(f"{file} also holds a fine-tuned text encoder, which cdiff deltas cannot carry")
    unet, mods = obj.get("unet"), obj.get("modifier_token")
    if not isinstance(unet, dict):
        raise CdiffError(f"{file}: the reference delta has no 'unet' weights")
    weights = {str(k): _as_weight(file, k, v) for k, v in unet.items()}
    if not isinstance(mods, dict) or not mods:
        raise CdiffError(f"{file}: no token embedding found (the 'modifier_token' entry is missing or empty)")
    tokens = [str(t) for t in mods]
    return _make_delta(file, weights, tokens, *_stack_pairs(file, [_as_embeddings(file, t, v) for t, v in mods.items()]))


def _load_reference_ckpt(file: Path, obj: dict, layers_per_block: int) -> Delta:
    sd = obj["state_dict"]
    if not isinstance(sd, dict):
        raise CdiffError(f"{file}: 'state_dict' is not a dict of tensors")
    weights = {}
    for key, value in sd.items():
        if key == CKPT_EMBED_KEY:
            continue
        try:
            name = ldm_to_diffusers(str(key), layers_per_block)
        except CdiffError as e:
            raise CdiffError(f"{file}: {e}") from e
        weights[name] = _as_weight(file, key, value)
    embed = sd.get(CKPT_EMBED_KEY)
    if not isinstance(embed, torch.Tensor) or embed.numel() == 0:
        raise CdiffError(f"{file}: no token embedding found (no '{CKPT_EMBED_KEY}' entry: trained without new tokens?)")
    embed = embed.detach().to(torch.float32)
    embed = embed.unsqueeze(0) if embed.ndim == 1 else embed
    tokens = [f"<new{i + 1}>" for i in range(embed.shape[0])]  # the checkpoint does not store token strings
    return _make_delta(file, weights, tokens, embed)


def _make_delta(file: Path, weights: dict, tokens: list[str], embeddings: torch.Tensor,
                embeddings_2: torch.Tensor | None = None) -> Delta:
    if not any(n.endswith(_KV_SUFFIXES) for n in weights):
        raise CdiffError(f"{file}: no cross-attention k/v weights found")
    mode = "crossattn" if any(n.endswith(_QOUT_SUFFIXES) for n in weights) else "kv"
    return Delta(weights, tokens, embeddings, mode, embeddings_2=embeddings_2)


def _renamed(delta: Delta, token_rename, path) -> Delta:
    """Apply a dict old->new or a list of new names (in order) to the delta's tokens."""
    if token_rename is None:
        return delta
    if isinstance(token_rename, dict):
        unknown = [t for t in token_rename if t not in delta.tokens]
        if unknown:
            raise CdiffError(f"{path}: cannot rename {unknown[0]!r}: the delta's tokens are {', '.join(delta.tokens)}")
        new = [token_rename.get(t, t) for t in delta.tokens]
    else:
        new = [str(t) for t in token_rename]
        if len(new) != len(delta.tokens):
            raise CdiffError(
                f"{path}: {len(new)} new token name(s) given for {len(delta.tokens)} token(s) ({', '.join(delta.tokens)})"
            )
    if len({t.lower() for t in new}) != len(new):
        raise CdiffError(f"{path}: renaming would give two tokens the same name: {', '.join(new)}")
    return Delta(delta.weights, new, delta.embeddings, delta.mode, dict(delta.extra), embeddings_2=delta.embeddings_2)


def _read_lora_export(folder: Path) -> tuple[Path, list[str], torch.Tensor, torch.Tensor | None]:
    """(LoRA file, tokens, embeddings, SDXL second-encoder embeddings or None) of a `cdiff export --format lora`
    folder: its manifest names the LoRA file and which token each embedding file is."""
    try:
        manifest = json.loads((folder / LORA_MANIFEST).read_text(encoding="utf-8"))
        entries = manifest["tokens"]
        lora_name = manifest["lora"]
        names = [(str(e["token"]), e["file"]) for e in entries]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise CdiffError(f"{folder / LORA_MANIFEST} is not a valid cdiff LoRA export manifest: {first_line(e)}") from e
    lora_file = _inside(folder, lora_name, folder / LORA_MANIFEST)
    files = [(t, _inside(folder, f, folder / LORA_MANIFEST)) for t, f in names]
    read = [_read_token_file(f) for _, f in files]
    return lora_file, [t for t, _ in files], *_stack_pairs(folder, [(a, b) for _, a, b in read])


def _load_lora(path: Path, base_unet, embeddings: list | None) -> Delta:
    from cdiff_cli.lora import read_lora

    if base_unet is None:
        raise CdiffError(f"{path}: a LoRA holds differences from its base model; the base is needed to import it")
    emb_2 = None
    if path.is_dir():
        lora_file, tokens, emb, emb_2 = _read_lora_export(path)
    elif (path.parent / LORA_MANIFEST).is_file() and not embeddings:
        lora_file, tokens, emb, emb_2 = _read_lora_export(path.parent)
    else:
        if not embeddings:
            raise CdiffError(f"{path} is a bare LoRA: give its token embedding file(s) with --embedding")
        lora_file, tokens, pairs = path, [], []
        for f in map(Path, embeddings):
            token, vec, vec_2 = _read_token_file(f)
            tokens.append(f"<{f.stem}>" if token == WEBUI_EMBED_KEY else token)
            pairs.append((vec, vec_2))
        emb, emb_2 = _stack_pairs(path, pairs)
    weights = read_lora(lora_file, dict(base_unet.named_parameters()))
    return _make_delta(lora_file, weights, tokens, emb, emb_2)


def load_delta_file(path, base_unet=None, token_rename: dict | list | None = None, embeddings: list | None = None) -> Delta:
    """Import a delta from any supported format (file or folder; see the module doc).

    `base_unet` gives layers_per_block for LDM checkpoints and the W0 of a LoRA and, when given, the delta
    is checked against it. `token_rename` is a dict old->new or a list of new names in order. `embeddings`
    are token files (textual-inversion format) for a bare LoRA file.
    """
    fmt, file, obj = _locate(path)
    if embeddings and fmt != "lora":
        raise CdiffError(f"--embedding applies to LoRA files only; {path} is in {fmt} format")
    if fmt == "lora":
        delta = _load_lora(Path(path), base_unet, embeddings)
    elif fmt == "cdiff":
        delta = Delta.load(file)
    elif fmt == "diffusers":
        delta = _load_diffusers(file, obj)
    elif fmt == "reference":
        delta = _load_reference(file, obj)
    else:
        lpb = _layers_per_block(base_unet) if base_unet is not None else 2
        delta = _load_reference_ckpt(file, obj, lpb)
    delta.extra["source_format"] = fmt
    delta = _renamed(delta, token_rename, path)
    if base_unet is not None:
        check_against_base(delta, base_unet)
    return delta


def check_against_base(delta: Delta, unet, text_encoder=None, text_encoder_2=None) -> None:
    """Refuse a delta whose layers are missing from / shaped differently than the base model's."""
    params = dict(unet.named_parameters())
    for name, value in delta.weights.items():
        if name not in params:
            raise CdiffError(f"the delta's layer {name} does not exist in this base UNet")
        if tuple(params[name].shape) != tuple(value.shape):
            raise CdiffError(
                f"the delta's layer {name} has shape {tuple(value.shape)} but the base's has "
                f"{tuple(params[name].shape)}: was it trained on another base model?"
            )
    if text_encoder is not None:
        width = text_encoder.get_input_embeddings().weight.shape[1]
        if width != delta.token_dim:
            raise CdiffError(
                f"the delta's token embeddings are {delta.token_dim} wide but the base's text encoder uses {width}"
            )
    if text_encoder is not None and (text_encoder_2 is not None or delta.embeddings_2 is not None):
        if text_encoder_2 is None or delta.embeddings_2 is None:
            raise CdiffError("the delta and the base disagree on SDXL: one has two text encoders, the other one")
        width = text_encoder_2.get_input_embeddings().weight.shape[1]
        if width != delta.embeddings_2.shape[1]:
            raise CdiffError(f"the delta's second-encoder embeddings are {delta.embeddings_2.shape[1]} wide, the base's {width}")


# --------------------------------------------------------------------------- exporting


def _token_file_name(token: str) -> str:
    """`<token>.safetensors`, refusing tokens that cannot be a file name."""
    name = f"{token}.safetensors"
    if (
        not token
        or token in (".", "..")
        or any(c in token for c in "/\\\0")
        or any(ord(c) < 32 for c in token)
        or len(name.encode("utf-8")) > 255
        or name in (WEIGHTS_SAFE, CDIFF_FILE)
    ):
        raise CdiffError(f"token {token!r} cannot be used as a file name for the diffusers export; rename it first")
    return name


def export_diffusers(delta: Delta, out_dir) -> list[Path]:
    """Write the delta as diffusers' train_custom_diffusion.py would: processor weights + token files.

    Returns the written files. See `load_diffusers_export_into` for using them in plain diffusers.
    """
    names = [_token_file_name(t) for t in delta.tokens]
    if len({n.lower() for n in names}) != len(names):  # tokens are case-insensitive; so are some file systems
        raise CdiffError(f"the delta has two tokens that differ only in case: {', '.join(delta.tokens)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {to_processor_key(n): v.detach().to("cpu").contiguous() for n, v in delta.weights.items()}
    save_tensors(weights, out / WEIGHTS_SAFE, metadata={"format": "pt"})
    written = [out / WEIGHTS_SAFE]
    for token, name in zip(delta.tokens, names):
        save_tensors(token_tensors(delta, token), out / name, metadata={"format": "pt", "cdiff_token": token})
        written.append(out / name)
    manifest = {
        "format": "cdiff-diffusers-export",
        "version": 1,
        "mode": delta.mode,
        "weights": WEIGHTS_SAFE,
        "tokens": [{"token": t, "file": n} for t, n in zip(delta.tokens, names)],
    }
    (out / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    written.append(out / EXPORT_MANIFEST)
    return written


def _token_rows(delta: Delta, token: str) -> list[torch.Tensor]:
    """The token's embedding row, or for SDXL its two rows (first and second text encoder); copies, not views."""
    i = delta.tokens.index(token)
    rows = [delta.embeddings[i]] + ([delta.embeddings_2[i]] if delta.embeddings_2 is not None else [])
    return [r.detach().to("cpu", torch.float32).clone() for r in rows]


def token_tensors(delta: Delta, token: str, key: str | None = None) -> dict[str, torch.Tensor]:
    """A token file's tensors: `{key: row}` (`key` defaults to the token, as diffusers' script writes it),
    or for SDXL `{"clip_l": [1, d1], "clip_g": [1, d2]}`, the layout diffusers' docs, the webui and ComfyUI read."""
    rows = _token_rows(delta, token)
    if len(rows) == 1:
        # diffusers' script stores {token: [dim]}; the webui's files are {"emb_params": [1, dim]}
        return {token: rows[0]} if key is None else {key: rows[0].reshape(1, -1).contiguous()}
    return {k: r.reshape(1, -1).contiguous() for k, r in zip(SDXL_EMBED_KEYS, rows)}


def export_reference(delta: Delta, out_dir) -> list[Path]:
    """Write the reference diffusers scripts' `delta.bin` ({"unet": ..., "modifier_token": ...}); for SDXL each
    token maps to a list of two rows, as the reference SDXL script saves it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sdxl = delta.embeddings_2 is not None
    payload = {
        "unet": {n: v.detach().to("cpu").clone() for n, v in delta.weights.items()},
        "modifier_token": {t: (_token_rows(delta, t) if sdxl else _token_rows(delta, t)[0]) for t in delta.tokens},
    }
    torch.save(payload, out / REFERENCE_FILE)
    return [out / REFERENCE_FILE]


def load_diffusers_export_into(pipe, folder) -> list[str]:
    """Load an `export_diffusers` folder into a plain diffusers StableDiffusion(XL)Pipeline; returns the tokens.

    Uses only the exported files and public diffusers/safetensors calls, so the README can show it
    as-is. The processor weights are full fine-tuned values, so copying them over the UNet's own
    attn2 weights gives exactly the fine-tuned model with the stock attention processors.
    (`pipe.unet.load_attn_procs` is not used: in diffusers 0.42, called on a bare UNet it builds
    the processors but never installs them, and with `_pipeline=pipe` it wants an entry for every
    attention layer, which a safetensors file cannot store for the untrained attn1 ones.)
    """
    folder = Path(folder)
    params = dict(pipe.unet.named_parameters())
    with torch.no_grad():
        for key, value in load_file(str(folder / WEIGHTS_SAFE)).items():
            # "X.attn2.processor.to_k_custom_diffusion.weight" -> "X.attn2.to_k.weight"
            module, _, sub = key.rpartition(".processor.")
            p = params[f"{module}.{sub.replace('_custom_diffusion', '')}"]
            p.copy_(value.to(p.device, p.dtype))
    manifest = json.loads((folder / EXPORT_MANIFEST).read_text(encoding="utf-8"))
    tokens = []
    for entry in manifest["tokens"]:
        file = str(folder / entry["file"])
        if getattr(pipe, "text_encoder_2", None) is None:
            pipe.load_textual_inversion(file, token=entry["token"])
        else:  # SDXL: one call per text encoder, as diffusers' docs show
            state = load_file(file)
            pipe.load_textual_inversion(state["clip_l"], token=entry["token"], text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(state["clip_g"], token=entry["token"], text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
        tokens.append(entry["token"])
    return tokens


# --------------------------------------------------------------------------- the base an export was made on


def write_base_record(out_dir, base: dict) -> Path:
    """Write `cdiff_base.json` (the entry's base record: ref, fingerprint, probe) into an export folder."""
    record = {"format": "cdiff-base", "version": 1, **{k: base[k] for k in ("ref", "fingerprint", "probe") if k in base}}
    path = Path(out_dir) / BASE_FILE
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def read_base_record(path) -> dict | None:
    """The base record beside an export (in the folder, or beside the file given), or None when there is none.
    The file comes from elsewhere: it must be a small regular file holding a string ref and fingerprint."""
    p = Path(path)
    file = (p if p.is_dir() else p.parent) / BASE_FILE
    if not file.exists() and not file.is_symlink():
        return None
    if file.is_symlink() or not file.is_file() or file.stat().st_size > _BASE_FILE_LIMIT:
        raise CdiffError(f"{file}: not a regular file of a few hundred bytes; remove it or give --base")
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CdiffError(f"{file}: unreadable ({first_line(e)}); remove it or give --base") from e
    if not (isinstance(record, dict) and isinstance(record.get("ref"), str) and record["ref"]
            and isinstance(record.get("fingerprint"), str)):
        raise CdiffError(f"{file}: does not name a base (a string ref and fingerprint); remove it or give --base")
    out = {"ref": record["ref"], "fingerprint": record["fingerprint"]}
    probe = record.get("probe")
    if isinstance(probe, list) and probe and all(type(x) in (int, float) and math.isfinite(x) for x in probe):
        out["probe"] = probe  # else compared by fingerprint alone
    return out

