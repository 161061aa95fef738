"""Importing: a file or folder of any supported format into a `Delta`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from cdiff_cli.core.delta import Delta
from cdiff_cli.errors import CdiffError, first_line, option_error
from cdiff_cli.formats.names import (
    _KV_SUFFIXES,
    _QOUT_SUFFIXES,
    CDIFF_FILE,
    CKPT_EMBED_KEY,
    EXPORT_MANIFEST,
    LORA_MANIFEST,
    REFERENCE_FILE,
    SDXL_EMBED_KEYS,
    WEBUI_EMBED_KEY,
    WEIGHTS_BIN,
    WEIGHTS_SAFE,
    _layers_per_block,
    from_processor_key,
    ldm_to_diffusers,
)
from cdiff_cli.formats.sniff import _is_safetensors, _locate, _read_tensor_file, _safetensors_metadata


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
    from cdiff_cli.formats.lora import read_lora

    if base_unet is None:
        raise CdiffError(f"{path}: a LoRA holds differences from its base model; the base is needed to import it")
    emb_2 = None
    if path.is_dir():
        lora_file, tokens, emb, emb_2 = _read_lora_export(path)
    elif (path.parent / LORA_MANIFEST).is_file() and not embeddings:
        lora_file, tokens, emb, emb_2 = _read_lora_export(path.parent)
    else:
        if not embeddings:
            raise option_error("{path} is a bare LoRA: give its token embedding file(s) with {embeddings}", "embeddings", path=path)
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
        raise option_error("{embeddings} applies to LoRA files only; {path} is in {fmt} format", "embeddings", path=path, fmt=fmt)
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


