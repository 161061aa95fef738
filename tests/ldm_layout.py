"""Write a diffusers Stable Diffusion pipeline as an original-layout (LDM/SGM) single-file checkpoint, the
format of `.safetensors`/`.ckpt` files that users download, so tests can load real single files offline.

Only what the tiny test models use is mapped (their UNet: one `layers_per_block`, one transformer layer
per block). `tests/test_single_file.py` checks the mapping against diffusers' own converters first.
"""

from __future__ import annotations

import re

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_STATIC = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
                "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _resnet(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    n = unet.config.layers_per_block + 1  # LDM blocks per level: the layers and the down/upsampler
    with_attention = {i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t}
    out = {}
    for key, v in unet.state_dict().items():
        module, _, param = key.rpartition(".")
        if module in _UNET_STATIC:
            new = f"{_UNET_STATIC[module]}.{param}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            new = (f"input_blocks.{1 + i * n + j}.0.{_resnet(rest, _RESNET)}" if kind == "resnets"
                   else f"input_blocks.{1 + i * n + j}.1.{rest}")
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{1 + int(m[1]) * n + n - 1}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2], _RESNET)}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            new = (f"output_blocks.{i * n + j}.0.{_resnet(rest, _RESNET)}" if kind == "resnets"
                   else f"output_blocks.{i * n + j}.1.{rest}")
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            i = int(m[1])
            new = f"output_blocks.{i * n + n - 1}.{2 if i in with_attention else 1}.conv.{m[2]}"
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        out[f"model.diffusion_model.{new}"] = v
    return out


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    res = {"conv_shortcut": "nin_shortcut"}
    out = {}
    for key, v in vae.state_dict().items():
        new = key
        if m := re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            level = int(m[3]) if m[2] == "down" else levels - 1 - int(m[3])  # LDM numbers the decoder bottom-up
            new = f"{m[1]}.{m[2]}.{level}.block.{m[4]}.{_resnet(m[5], res)}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet(m[3], res)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight":
                v = v[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        out[f"first_stage_model.{new}"] = v
    return out


def _text_model(key: str) -> str:
    # transformers >= 5.6 flattened CLIPTextModel ("embeddings.", not "text_model.embeddings."); files keep the old names
    return key if key.startswith("text_model.") or key.startswith("text_projection") else f"text_model.{key}"


def sd_to_ldm(pipe, openclip: bool = False) -> dict[str, torch.Tensor]:
    """An SD 1.x/2.x pipeline's UNet, VAE and text encoder, in one original-layout dict; the text encoder
    in HF CLIP layout (SD 1.x) or with `openclip` in OpenCLIP layout (SD 2.x)."""
    if openclip:
        text = openclip_layout(pipe.text_encoder, "cond_stage_model.model.")
    else:
        text = {f"cond_stage_model.transformer.{_text_model(k)}": v for k, v in pipe.text_encoder.state_dict().items()}
    return {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae), **text}


_OPENCLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}


def openclip_layout(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text encoder in OpenCLIP's layout (SD 2.x's and SDXL's second encoder): fused q/k/v
    projections, `resblocks`, and `text_projection` as a matrix applied on the right."""
    sd = {_text_model(k): v for k, v in text_encoder.state_dict().items()}
    out = {
        "token_embedding.weight": sd.pop("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight": sd.pop("text_model.final_layer_norm.weight"),
        "ln_final.bias": sd.pop("text_model.final_layer_norm.bias"),
    }
    if "text_projection.weight" in sd:
        out["text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    layers = {int(m[1]) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    for i in sorted(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"])
        for k in [k for k in sd if k.startswith(src)]:
            rest = k[len(src):]
            for old, new in _OPENCLIP.items():
                rest = rest.replace(old, new)
            out[dst + rest] = sd.pop(k)
    if sd:
        raise KeyError(f"no OpenCLIP names for {sorted(sd)}")
    return {prefix + k: v for k, v in out.items()}


def sdxl_to_sgm(pipe) -> dict[str, torch.Tensor]:
    """An SDXL pipeline in the original (SGM) layout: its first text encoder in HF layout, its second in
    OpenCLIP layout (`conditioner.embedders.1.`, the key cdiff recognises SDXL files by)."""
    text = {f"conditioner.embedders.0.transformer.{_text_model(k)}": v for k, v in pipe.text_encoder.state_dict().items()}
    return {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae), **text, **openclip_layout(pipe.text_encoder_2, "conditioner.embedders.1.model.")}
