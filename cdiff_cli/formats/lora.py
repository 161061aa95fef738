"""A concept as a LoRA plus textual-inversion embeddings: the files ComfyUI and AUTOMATIC1111 load.

Layout written by `export_lora` (and read back by `cdiff_cli.formats`, for `cdiff add`):

    OUT/NAME.safetensors                 the k/v updates W - W0 as a kohya-style LoRA:
                                         lora_unet_<module>.lora_down.weight [r, in]
                                         lora_unet_<module>.lora_up.weight   [out, r]
                                         lora_unet_<module>.alpha            (= r: the scale alpha/r is 1)
    OUT/embeddings/STEM.safetensors      one per token: {"emb_params": [1, dim]} (the webui's format);
                                         SDXL: {"clip_l": [1, dim_1], "clip_g": [1, dim_2]}
    OUT/cdiff_lora.json                  which token each embedding file is, for `cdiff add`

Module names are diffusers' with dots as underscores, which is what kohya's sd-scripts write for SD 1.x/2.x
and what ComfyUI, the webui and diffusers' `load_lora_weights` map back onto the UNet.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from cdiff_cli.core.delta import Delta
from cdiff_cli.core.layers import is_kv
from cdiff_cli.core.lowrank import factorize, relative_error
from cdiff_cli.errors import CdiffError
from cdiff_cli.files import save_tensors
from cdiff_cli.formats.names import LORA_MANIFEST, WEBUI_EMBED_KEY
from cdiff_cli.formats.writing import token_tensors

PREFIX = "lora_unet_"
EMBED_DIR = "embeddings"


def lora_module(param: str) -> str:
    """`down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight` ->
    `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k`."""
    return PREFIX + param.removesuffix(".weight").replace(".", "_")


def embedding_stem(token: str) -> str:
    """The file stem (and so the prompt word in the webui) for a token: `<my-cat>` -> `my-cat`."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", token).strip("._")
    if not stem:
        raise CdiffError(f"token {token!r} has no characters usable in a file name; rename it first")
    return stem


def kv_updates(delta: Delta, base_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """W - W0 for every k/v layer of the delta; refuses deltas that changed anything else (a LoRA of
    k/v cannot hold the crossattn mode's query, output and bias updates)."""
    other = [n for n in delta.weights if not is_kv(n)]
    if other:
        raise CdiffError(
            f"a LoRA export holds cross-attention k/v updates only; this entry also changed {len(other)} other "
            f"parameter(s) (trained in {delta.mode} mode), e.g. {other[0]}"
        )
    missing = [n for n in delta.weights if n not in base_weights]
    if missing:
        raise CdiffError(f"the delta's layer {missing[0]} does not exist in the base model")
    return {n: delta.weights[n].float() - base_weights[n].detach().to("cpu", torch.float32) for n in delta.weights}


def export_lora(
    delta: Delta,
    base_weights: dict[str, torch.Tensor],
    out_dir,
    name: str,
    *,
    rank: int | None = None,
    energy: float | None = 1.0,
    dtype: torch.dtype = torch.float16,
    metadata: dict[str, str] | None = None,
) -> tuple[list[Path], dict]:
    """Write the LoRA and embedding files; returns (files, stats) with the largest relative error of any
    layer's factorisation and the ranks used. Default: full rank (energy 1.0), which is exact up to fp16."""
    updates = kv_updates(delta, base_weights)
    if rank is not None:
        energy = None
    stems = [embedding_stem(t) for t in delta.tokens]
    if len({s.lower() for s in stems}) != len(stems):
        raise CdiffError(f"two tokens map to the same embedding file name: {', '.join(delta.tokens)}")
    out = Path(out_dir)
    (out / EMBED_DIR).mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    ranks, worst = [], 0.0
    for param, update in sorted(updates.items()):
        up, down = (f.to(dtype) for f in factorize(update, rank=rank, energy=energy))
        r = up.shape[1]
        key = lora_module(param)
        tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"] = up, down
        tensors[f"{key}.alpha"] = torch.tensor(float(r), dtype=dtype)
        worst = max(worst, relative_error(update, up, down))  # as stored: fp16 rounding included
        ranks.append(r)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(ranks) if ranks else 0),
        "ss_network_alpha": str(max(ranks) if ranks else 0),
        "cdiff_format": "lora-kv",
        "cdiff_tokens": json.dumps(delta.tokens),
        **(metadata or {}),
    }
    lora_file = out / f"{name}.safetensors"
    save_tensors(tensors, lora_file, metadata=meta)
    written = [lora_file]
    for token, stem in zip(delta.tokens, stems):
        file = out / EMBED_DIR / f"{stem}.safetensors"
        save_tensors(token_tensors(delta, token, key=WEBUI_EMBED_KEY), file, metadata={"cdiff_token": token})
        written.append(file)
    manifest = {
        "format": "cdiff-lora-export",
        "version": 1,
        "lora": lora_file.name,
        "tokens": [{"token": t, "file": f"{EMBED_DIR}/{s}.safetensors"} for t, s in zip(delta.tokens, stems)],
    }
    (out / LORA_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    written.append(out / LORA_MANIFEST)
    stats = {"max_relative_error": worst, "min_rank": min(ranks, default=0), "max_rank": max(ranks, default=0),
             "bytes": lora_file.stat().st_size}
    return written, stats


# --------------------------------------------------------------------------- reading LoRA files


def _alpha(path: Path, module: str, value: torch.Tensor) -> float:
    """A LoRA's alpha: one positive, finite number (0 would import nothing, a negative one the opposite)."""
    if value.numel() != 1 or not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
        raise CdiffError(f"{path}: {module}.alpha is not a single number")
    alpha = float(value.reshape(()))
    if not (math.isfinite(alpha) and alpha > 0):
        raise CdiffError(f"{path}: {module}.alpha is {alpha}; a LoRA's alpha must be a positive number")
    return alpha


def read_lora(path, base_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full fine-tuned weights W0 + (alpha / r) up @ down for a LoRA whose targets are all cross-attention
    k/v layers of the base; anything else is refused (cdiff's deltas and merges are defined on k/v)."""
    path = Path(path)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:
        raise CdiffError(f"cannot read {path}: {e}") from e
    by_module = {lora_module(n): n for n in base_weights if is_kv(n)}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, part = key.partition(".")
        modules.setdefault(module, {})[part] = value
    weights = {}
    for module, parts in sorted(modules.items()):
        param = by_module.get(module)
        if param is None:
            what = "a text-encoder layer" if module.startswith("lora_te") else "not a cross-attention k/v layer of this base"
            raise CdiffError(f"{path}: LoRA target {module} is {what}; only LoRAs of cross-attention k/v can be imported")
        if "lora_up.weight" not in parts or "lora_down.weight" not in parts:
            raise CdiffError(f"{path}: {module} lacks lora_up or lora_down (not a plain LoRA: {', '.join(sorted(parts))})")
        up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0] or up.shape[1] == 0:
            raise CdiffError(f"{path}: {module} has factors of shapes {tuple(up.shape)} and {tuple(down.shape)}")
        w0 = base_weights[param].detach().to("cpu", torch.float32)
        if (up.shape[0], down.shape[1]) != tuple(w0.shape):
            raise CdiffError(f"{path}: {module} is {up.shape[0]}x{down.shape[1]}, the base layer is {tuple(w0.shape)}")
        scale = _alpha(path, module, parts["alpha"]) / up.shape[1] if "alpha" in parts else 1.0
        weights[param] = w0 + scale * (up @ down)
    if not weights:
        raise CdiffError(f"{path}: no LoRA layers found")
    return weights
