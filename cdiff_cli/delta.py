"""A concept delta: fine-tuned cross-attention weights plus the learned token embeddings.

On disk it is one safetensors file: `unet.<param name>` for every trained UNet parameter (full
fine-tuned values, diffusers names) and `text.token_embeddings` ([n_tokens, dim]), with the token
strings and the training mode in the metadata.

A compressed delta (`cdiff compress`, metadata `storage: lowrank`) stores each k/v update W - W0 as
`unet.<param name>.lora_up` [out, r] and `.lora_down` [r, in] instead (any other parameter in full);
loading it needs the base UNet to expand W = W0 + up @ down.
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
LOWRANK = "lowrank"
_UP, _DOWN = ".lora_up", ".lora_down"


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
    def load(cls, path: str | Path, base_unet=None) -> "Delta":
        """Read a delta file; a compressed one is expanded against `base_unet` (required for those)."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise CdiffError(f"{path} is not a cdiff delta file")
                tensors = {k[5:]: f.get_tensor(k) for k in f.keys() if k.startswith("unet.")}
                emb = f.get_tensor(EMBED_KEY)
        except CdiffError:
            raise
        except Exception as e:  # safetensors raises several types for a corrupt file
            raise CdiffError(f"cannot read delta {path}: {e}") from e
        tokens, mode = json.loads(meta["tokens"]), meta.get("mode", "kv")
        if meta.get("storage") != LOWRANK:
            return cls(tensors, tokens, emb, mode)
        if base_unet is None:
            raise CdiffError(f"{path} is compressed (low-rank): its base model is needed to expand it")
        return cls(expand_lowrank(tensors, dict(base_unet.named_parameters()), path), tokens, emb, mode,
                   {"storage": LOWRANK})


def expand_lowrank(tensors: dict[str, torch.Tensor], base: dict[str, torch.Tensor], path="delta") -> dict[str, torch.Tensor]:
    """{name.lora_up, name.lora_down, other} -> full weights: W0 + up @ down per factorised layer."""
    weights = {}
    for key, value in tensors.items():
        if key.endswith(_DOWN):
            continue
        if not key.endswith(_UP):
            weights[key] = value
            continue
        name = key[: -len(_UP)]
        if name not in base:
            raise CdiffError(f"{path}: layer {name} does not exist in this base model")
        down = tensors.get(name + _DOWN)
        w0 = base[name].detach().to("cpu", torch.float32)
        if down is None or (value.shape[0], down.shape[1]) != tuple(w0.shape) or value.shape[1] != down.shape[0]:
            raise CdiffError(f"{path}: the factors of {name} do not fit the base layer {tuple(w0.shape)}")
        weights[name] = w0 + value.float() @ down.float()
    return weights


@dataclass
class LowRankDelta:
    """A delta whose k/v updates are stored as factors (see the module doc); `save` like Delta."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (up, down) of W - W0
    full: dict[str, torch.Tensor]  # parameters kept whole (crossattn mode's query/output)
    tokens: list[str]
    embeddings: torch.Tensor
    mode: str = "kv"
    dtype: torch.dtype = torch.float16

    def save(self, path: str | Path) -> None:
        tensors = {f"unet.{k}": v.detach().to("cpu").contiguous() for k, v in self.full.items()}
        for name, (up, down) in self.factors.items():
            tensors[f"unet.{name}{_UP}"] = up.detach().to("cpu", self.dtype).contiguous()
            tensors[f"unet.{name}{_DOWN}"] = down.detach().to("cpu", self.dtype).contiguous()
        tensors[EMBED_KEY] = self.embeddings.detach().to("cpu", torch.float32).contiguous()
        meta = {"format": FORMAT, "version": "1", "tokens": json.dumps(self.tokens), "mode": self.mode,
                "storage": LOWRANK}
        save_file(tensors, str(path), metadata=meta)

    def expanded(self, base: dict[str, torch.Tensor]) -> Delta:
        """The full delta this file loads as (factors rounded to the stored dtype, as on disk)."""
        tensors = dict(self.full)
        for name, (up, down) in self.factors.items():
            tensors[name + _UP], tensors[name + _DOWN] = up.to(self.dtype), down.to(self.dtype)
        return Delta(expand_lowrank(tensors, base), list(self.tokens), self.embeddings, self.mode, {"storage": LOWRANK})


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
