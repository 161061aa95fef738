"""Exporting a `Delta` as diffusers' and the reference scripts' files, and loading a diffusers export into a
plain pipeline (the recipe for users)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from cdiff_cli.core.delta import Delta
from cdiff_cli.errors import CdiffError
from cdiff_cli.files import save_tensors
from cdiff_cli.formats.names import (
    CDIFF_FILE,
    EXPORT_MANIFEST,
    REFERENCE_FILE,
    SDXL_EMBED_KEYS,
    WEIGHTS_SAFE,
    to_processor_key,
)


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


