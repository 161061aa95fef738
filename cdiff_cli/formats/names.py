"""Names: the files of each format, and the pure mapping between diffusers, Custom Diffusion processor and
LDM (CompVis) parameter names. No I/O."""

from __future__ import annotations

import re

from cdiff_cli.errors import CdiffError

FORMATS = ("cdiff", "diffusers", "reference", "reference-ckpt", "lora")

CDIFF_FILE = "delta.safetensors"
WEIGHTS_SAFE = "pytorch_custom_diffusion_weights.safetensors"  # diffusers' CUSTOM_DIFFUSION_WEIGHT_NAME_SAFE
WEIGHTS_BIN = "pytorch_custom_diffusion_weights.bin"  # diffusers' CUSTOM_DIFFUSION_WEIGHT_NAME
EXPORT_MANIFEST = "cdiff_export.json"
REFERENCE_FILE = "delta.bin"
LORA_MANIFEST = "cdiff_lora.json"  # which token each embedding file of a LoRA export is (cdiff_cli.formats.lora)
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


