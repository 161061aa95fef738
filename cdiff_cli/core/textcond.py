"""The text side of a pipeline, for SD 1.x/2.x (one CLIP text encoder) and SDXL (two).

SDXL's cross-attention k/v read the concatenation of both encoders' penultimate hidden states, and its
UNet also takes the second encoder's pooled (projected) output and six "time ids" (original size, crop
corner, target size) as added conditioning. Everything that encodes prompts goes through here so that
training, merging and evaluation see exactly the features the pipeline itself uses.
"""

from __future__ import annotations

import torch


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def encoders(pipe) -> list[tuple[object, torch.nn.Module]]:
    """(tokenizer, text encoder) pairs, in the order their features are concatenated."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if is_sdxl(pipe):
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def tokenize(tokenizer, prompts: list[str], padding: str = "max_length") -> torch.Tensor:
    return tokenizer(prompts, padding=padding, max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode(pipe, prompts: list[str], device, padding: str = "max_length") -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(hidden states the k/v read [B, L, D], pooled output for SDXL's added conditioning or None,
    the first tokenizer's ids [B, L]) for `prompts`, with gradients if enabled by the caller."""
    if not is_sdxl(pipe):
        ids = tokenize(pipe.tokenizer, prompts, padding).to(device)
        return pipe.text_encoder(ids)[0], None, ids
    hidden, pooled, first_ids = [], None, None
    for tok, te in encoders(pipe):
        ids = tokenize(tok, prompts, padding).to(device)
        first_ids = ids if first_ids is None else first_ids
        out = te(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection returns text_embeds first
    return torch.cat(hidden, dim=-1), pooled, first_ids


def added_conditioning(pipe, pooled: torch.Tensor | None, resolution: int) -> dict | None:
    """SDXL's added_cond_kwargs for square training crops of `resolution` px (no crop offset), else None."""
    if pooled is None:
        return None
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=pooled.device, dtype=pooled.dtype)
    return {"text_embeds": pooled, "time_ids": time_ids.expand(pooled.shape[0], -1)}


class UsedRows(torch.nn.Module):
    """A token-embedding table cut down to the rows of the ids it was built for.

    Training encodes a fixed set of prompts (the concept prompts with their augmentation prefixes and
    the regularisation captions), which use a few hundred of CLIP's 49,408 ids: the other rows are
    150 MB of fp32 weights (SD 1.x; SDXL's two tables 400 MB) that no step reads. It is called with the
    original ids and returns exactly the rows the full table would."""

    def __init__(self, table: torch.Tensor, ids: torch.Tensor):
        super().__init__()
        ids = torch.unique(ids.to(table.device))  # sorted
        self.register_buffer("ids", ids, persistent=False)
        self.weight = torch.nn.Parameter(table.detach()[ids].clone(), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.searchsorted(self.ids, input_ids).clamp_(max=len(self.ids) - 1)
        # An id outside the set would silently read another row; async, so no host sync on a GPU.
        torch._assert_async((self.ids[pos] == input_ids).all(), "a prompt uses a token the cut-down table lacks")
        return torch.nn.functional.embedding(pos, self.weight)


def keep_rows_for(pipe, prompts: list[str]) -> None:
    """Replace each text encoder's token-embedding table by the rows `prompts` use (start, end and
    padding ids included, as tokenized), freeing the rest. The pipeline can then encode only those
    prompts: for a caller that does not use it afterwards."""
    for tok, te in encoders(pipe):
        te.set_input_embeddings(UsedRows(te.get_input_embeddings().weight, tokenize(tok, prompts).flatten()))
