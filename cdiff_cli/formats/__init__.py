"""Import and export of concept deltas in the layouts of other Custom Diffusion tools.

Formats (names as `detect_format` returns them):

- "cdiff": cdiff's own `delta.safetensors` (see `cdiff_cli.core.delta`).
- "diffusers": the output folder of diffusers' `train_custom_diffusion.py` (and of
  `export_diffusers`): `pytorch_custom_diffusion_weights.safetensors` (or `.bin`) holding the
  Custom Diffusion attention-processor weights, plus one `<token>.safetensors` / `<token>.bin` per
  token holding `{token: embedding}`.
- "reference": the `delta.bin` of adobe-research/custom-diffusion's diffusers scripts,
  `{"unet": {diffusers param name: tensor}, "modifier_token": {token: embedding}}`.
- "reference-ckpt": the CompVis `delta_epoch=*.ckpt` of the same repository,
  `{"state_dict": {LDM param name: tensor, "embed": [n_new, dim]}}`.
- "lora": a kohya-style LoRA of cross-attention k/v (see `cdiff_cli.formats.lora`): cdiff's LoRA export folder,
  or a bare LoRA file with its token embeddings given separately (textual-inversion files).

All but "lora" store full fine-tuned weights (not differences), so importing is a renaming job; a LoRA
holds W - W0 and needs the base model's weights.
Pickled files are only ever opened with `torch.load(..., weights_only=True)`: a delta downloaded
from somewhere must not be able to run code.


Layout: `names` (file names and the pure name mappings, no I/O) at the bottom; `sniff` (which format a file
is, reading its tensors safely); `reading` (files to a `Delta`); `writing` (a `Delta` to files); `lora`
(kohya-style LoRA files); `base_record` (the base an export belongs to). Dependencies point down that list.
"""

from __future__ import annotations

from cdiff_cli.formats.base_record import read_base_record, write_base_record
from cdiff_cli.formats.names import (
    BASE_FILE,
    CDIFF_FILE,
    CKPT_EMBED_KEY,
    EXPORT_MANIFEST,
    FORMATS,
    LDM_PREFIX,
    LORA_MANIFEST,
    REFERENCE_FILE,
    SDXL_EMBED_KEYS,
    WEBUI_EMBED_KEY,
    WEIGHTS_BIN,
    WEIGHTS_SAFE,
    diffusers_to_ldm,
    from_processor_key,
    ldm_to_diffusers,
    to_processor_key,
)
from cdiff_cli.formats.reading import check_against_base, load_delta_file
from cdiff_cli.formats.sniff import MAX_EXPANDED_BYTES, detect_format
from cdiff_cli.formats.writing import export_diffusers, export_reference, load_diffusers_export_into, token_tensors

__all__ = ["BASE_FILE", "CDIFF_FILE", "CKPT_EMBED_KEY", "EXPORT_MANIFEST", "FORMATS", "LDM_PREFIX", "LORA_MANIFEST",
           "MAX_EXPANDED_BYTES", "REFERENCE_FILE", "SDXL_EMBED_KEYS", "WEBUI_EMBED_KEY", "WEIGHTS_BIN", "WEIGHTS_SAFE",
           "check_against_base", "detect_format", "diffusers_to_ldm", "export_diffusers", "export_reference",
           "from_processor_key", "ldm_to_diffusers", "load_delta_file", "load_diffusers_export_into",
           "read_base_record", "to_processor_key", "token_tensors", "write_base_record"]
