"""A concept delta: fine-tuned cross-attention weights plus the learned token embeddings.

On disk it is one safetensors file: `unet.<param name>` for every trained UNet parameter (full
fine-tuned values, diffusers names) and `text.token_embeddings` ([n_tokens, dim]), with the token
strings and the training mode in the metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cdiff_cli.errors import CdiffError
from cdiff_cli.layers import write_weights

FORMAT = "cdiff-delta"
EMBED_KEY = "text.token_embeddings"


@dataclass
class Delta:
    weights: dict[str, torch.Tensor]
    tokens: list[str]
    embeddings: torch.Tensor  # [len(tokens), dim]
    mode: str = "kv"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != len(self.tokens):
            raise CdiffError(
                f"delta has {len(self.tokens)} token(s) but embeddings of shape {tuple(self.embeddings.shape)}"
            )

    @property
    def token_dim(self) -> int:
        return int(self.embeddings.shape[1])

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights.values()) + self.embeddings.numel() * 4

    def embedding_of(self, token: str) -> torch.Tensor:
        return self.embeddings[self.tokens.index(token)]

    def renamed(self, mapping: dict[str, str]) -> "Delta":
        return Delta(dict(self.weights), [mapping.get(t, t) for t in self.tokens], self.embeddings.clone(), self.mode)

    def save(self, path: str | Path) -> None:
        tensors = {f"unet.{k}": v.detach().to("cpu").contiguous() for k, v in self.weights.items()}
        tensors[EMBED_KEY] = self.embeddings.detach().to("cpu", torch.float32).contiguous()
        meta = {"format": FORMAT, "version": "1", "tokens": json.dumps(self.tokens), "mode": self.mode}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "Delta":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise CdiffError(f"{path} is not a cdiff delta file")
                weights = {k[5:]: f.get_tensor(k) for k in f.keys() if k.startswith("unet.")}
                emb = f.get_tensor(EMBED_KEY)
        except CdiffError:
            raise
        except Exception as e:  # safetensors raises several types for a corrupt file
            raise CdiffError(f"cannot read delta {path}: {e}") from e
        return cls(weights, json.loads(meta["tokens"]), emb, meta.get("mode", "kv"))


def apply_delta(pipe, delta: Delta) -> list[int]:
    """Write a delta into a loaded pipeline: UNet weights in place, tokens added to the tokenizer.

    Returns the token ids. Sampling afterwards costs exactly what the plain pipeline costs.
    """
    from cdiff_cli.tokens import add_tokens

    try:
        write_weights(pipe.unet, delta.weights)
    except KeyError as e:
        raise CdiffError(f"the delta's layer {e.args[0]} does not exist in this base model") from e
    except ValueError as e:
        raise CdiffError(f"the delta does not fit this base model: {e}") from e
    return add_tokens(pipe.tokenizer, pipe.text_encoder, delta.tokens, delta.embeddings)
