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

from cdiff_cli.core.layers import write_weights
from cdiff_cli.errors import CdiffError
from cdiff_cli.files import share_as_umask

FORMAT = "cdiff-delta"
EMBED_KEY = "text.token_embeddings"
EMBED_KEY_2 = "text_2.token_embeddings"  # SDXL's second text encoder
LOWRANK = "lowrank"
_UP, _DOWN = ".lora_up", ".lora_down"


@dataclass
class Delta:
    weights: dict[str, torch.Tensor]
    tokens: list[str]
    embeddings: torch.Tensor  # [len(tokens), dim]
    mode: str = "kv"
    extra: dict = field(default_factory=dict)
    embeddings_2: torch.Tensor | None = None  # SDXL: the rows for the second text encoder [len(tokens), dim_2]

    def __post_init__(self):
        for e in (self.embeddings, self.embeddings_2):
            if e is not None and (e.ndim != 2 or e.shape[0] != len(self.tokens)):
                raise CdiffError(f"delta has {len(self.tokens)} token(s) but embeddings of shape {tuple(e.shape)}")

    @property
    def token_dim(self) -> int:
        return int(self.embeddings.shape[1])

    def num_bytes(self) -> int:
        rows = self.embeddings.numel() + (self.embeddings_2.numel() if self.embeddings_2 is not None else 0)
        return sum(t.numel() * t.element_size() for t in self.weights.values()) + rows * 4

    def renamed(self, mapping: dict[str, str]) -> Delta:
        return Delta(dict(self.weights), [mapping.get(t, t) for t in self.tokens], self.embeddings.clone(), self.mode,
                     embeddings_2=self.embeddings_2)

    def save(self, path: str | Path) -> None:
        tensors = {f"unet.{k}": v.detach().to("cpu").contiguous() for k, v in self.weights.items()}
        _put_embeddings(tensors, self.embeddings, self.embeddings_2)
        meta = {"format": FORMAT, "version": "1", "tokens": json.dumps(self.tokens), "mode": self.mode}
        save_file(tensors, str(path), metadata=meta)
        share_as_umask(path)  # safetensors writes 0600

    @classmethod
    def load(cls, path: str | Path, base_unet=None) -> Delta:
        """Read a delta file; a compressed one is expanded against `base_unet` (required for those)."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise CdiffError(f"{path} is not a cdiff delta file")
                tensors = {k[5:]: f.get_tensor(k) for k in f.keys() if k.startswith("unet.")}
                emb = f.get_tensor(EMBED_KEY)
                emb_2 = f.get_tensor(EMBED_KEY_2) if EMBED_KEY_2 in f.keys() else None
        except CdiffError:
            raise
        except Exception as e:  # safetensors raises several types for a corrupt file
            raise CdiffError(f"cannot read delta {path}: {e}") from e
        try:
            tokens = json.loads(meta.get("tokens", ""))
        except (ValueError, RecursionError):
            tokens = None
        if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
            raise CdiffError(f"{path}: its token list (the 'tokens' metadata) is missing or unreadable")
        mode = meta.get("mode", "kv")
        if meta.get("storage") != LOWRANK:
            return cls(tensors, tokens, emb, mode, embeddings_2=emb_2)
        if base_unet is None:
            raise CdiffError(f"{path} is compressed (low-rank): its base model is needed to expand it")
        return cls(expand_lowrank(tensors, dict(base_unet.named_parameters()), path), tokens, emb, mode,
                   {"storage": LOWRANK}, embeddings_2=emb_2)


def content_problem(weights: dict, tokens, mode: str, embeddings: list) -> str | None:
    """What makes a delta unfit to use, in words, or None. A delta comes from files made elsewhere: each
    layer must be a cross-attention weight its mode trains (a "concept" may not replace the rest of the
    UNet), every value a finite floating-point number (NaN turns images black and a merge spreads it),
    and there must be at least one token. Low-rank factors (name.lora_up / .lora_down) count as their layer."""
    from cdiff_cli.core.layers import MODES, mode_suffixes

    if mode not in MODES:
        return f"its mode {mode!r} is not one of {', '.join(MODES)}"
    if not tokens or not all(isinstance(t, str) and t for t in tokens):
        return "it has no token" if not tokens else f"its token list {tokens!r} holds an empty or non-text token"
    allowed = mode_suffixes(mode)
    for key, value in weights.items():
        name = key.removesuffix(_UP).removesuffix(_DOWN)
        if not name.endswith(allowed):
            return f"layer {name} is not a cross-attention {'/'.join(s.split('.')[1] for s in allowed)} weight of mode {mode}"
        if problem := _values_problem(value):
            return f"layer {name} {problem}"
    for e in embeddings:
        if e is not None and (problem := _values_problem(e)):
            return f"its token embeddings {problem}"
    return None


def _values_problem(t: torch.Tensor) -> str | None:
    if not t.is_floating_point():
        return f"holds {str(t.dtype).removeprefix('torch.')} values, not floating point"
    if not bool(torch.isfinite(t).all()):
        return "holds NaN or infinite values"
    return None


def check_content(delta: Delta, where) -> None:
    """CdiffError naming `where` (a file, an entry) when the delta's content is unfit (`content_problem`)."""
    if problem := content_problem(delta.weights, delta.tokens, delta.mode, [delta.embeddings, delta.embeddings_2]):
        raise CdiffError(f"{where}: {problem}")


def _put_embeddings(tensors: dict, emb: torch.Tensor, emb_2: torch.Tensor | None) -> None:
    tensors[EMBED_KEY] = emb.detach().to("cpu", torch.float32).contiguous()
    if emb_2 is not None:
        tensors[EMBED_KEY_2] = emb_2.detach().to("cpu", torch.float32).contiguous()


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
    embeddings_2: torch.Tensor | None = None

    def save(self, path: str | Path) -> None:
        tensors = {f"unet.{k}": v.detach().to("cpu").contiguous() for k, v in self.full.items()}
        for name, (up, down) in self.factors.items():
            tensors[f"unet.{name}{_UP}"] = up.detach().to("cpu", self.dtype).contiguous()
            tensors[f"unet.{name}{_DOWN}"] = down.detach().to("cpu", self.dtype).contiguous()
        _put_embeddings(tensors, self.embeddings, self.embeddings_2)
        meta = {"format": FORMAT, "version": "1", "tokens": json.dumps(self.tokens), "mode": self.mode,
                "storage": LOWRANK}
        save_file(tensors, str(path), metadata=meta)
        share_as_umask(path)  # safetensors writes 0600

    def expanded(self, base: dict[str, torch.Tensor]) -> Delta:
        """The full delta this file loads as (factors rounded to the stored dtype, as on disk)."""
        tensors = dict(self.full)
        for name, (up, down) in self.factors.items():
            tensors[name + _UP], tensors[name + _DOWN] = up.to(self.dtype), down.to(self.dtype)
        return Delta(expand_lowrank(tensors, base), list(self.tokens), self.embeddings, self.mode, {"storage": LOWRANK},
                     embeddings_2=self.embeddings_2)


def apply_delta(pipe, delta: Delta) -> list[int]:
    """Write a delta into a loaded pipeline: UNet weights in place, tokens added to the tokenizer(s).

    Returns the token ids. Sampling afterwards costs exactly what the plain pipeline costs.
    """
    _check_text_encoders(pipe, delta.embeddings_2)  # before anything is written
    try:
        write_weights(pipe.unet, delta.weights)
    except KeyError as e:
        raise CdiffError(f"the delta's layer {e.args[0]} does not exist in this base model") from e
    except ValueError as e:
        raise CdiffError(f"the delta does not fit this base model: {e}") from e
    return add_delta_tokens(pipe, delta.tokens, delta.embeddings, delta.embeddings_2)


def add_delta_tokens(pipe, tokens: list[str], embeddings: torch.Tensor, embeddings_2: torch.Tensor | None = None) -> list[int]:
    """Add concept tokens with their rows to the pipeline's tokenizer and text encoder, and for SDXL to
    the second pair too. Returns the ids in the first tokenizer."""
    from cdiff_cli.core.tokens import add_tokens

    _check_text_encoders(pipe, embeddings_2)
    ids = add_tokens(pipe.tokenizer, pipe.text_encoder, tokens, embeddings)
    if embeddings_2 is not None:
        add_tokens(pipe.tokenizer_2, pipe.text_encoder_2, tokens, embeddings_2)
    return ids


def _check_text_encoders(pipe, embeddings_2: torch.Tensor | None) -> None:
    if getattr(pipe, "text_encoder_2", None) is not None and embeddings_2 is None:
        raise CdiffError("this delta has no embeddings for SDXL's second text encoder: it was trained on an SD 1.x/2.x base")
    if getattr(pipe, "text_encoder_2", None) is None and embeddings_2 is not None:
        raise CdiffError("this delta was trained on an SDXL base (two text encoders); this base has one")
