"""Modifier tokens: validation, adding them to a tokenizer, and finding them in prompts.

Tokens are added with `tokenizer.add_tokens(str)`, exactly as diffusers' `load_textual_inversion`
does, so a prompt tokenizes the same in cdiff and in a plain diffusers pipeline. CLIP tokenizers
lower-case the text and match added tokens after that normalisation, so `V1` and `v1` are the same
token; tokens are compared case-insensitively everywhere.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from cdiff_cli.errors import CdiffError

if TYPE_CHECKING:
    import torch

_TOKEN_RE = re.compile(r"^[^\s,;\"']{1,40}$")


def canonical(token: str) -> str:
    return token.lower()


def validate_token(token: str, tokenizer=None, ordinary_words: set[str] | None = None) -> str:
    """Refuse tokens that would be ambiguous in prompts; return the token unchanged if fine.

    An all-letter token that is an ordinary word (a whole-word entry of the tokenizer's vocabulary,
    or a word of the shipped captions) would hijack that word in every prompt, and a short all-letter
    token would split other words (`at` inside `cat`), so those are refused. Tokens with a digit or
    punctuation (`<mycat>`, `V1`) are safe.
    """
    if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):  # fullmatch: `$` also matches before a final newline
        raise CdiffError(f"invalid token {token!r}: use 1-40 characters without spaces, commas or quotes")
    low = canonical(token)
    if low.isalpha():
        if len(low) < 4:
            raise CdiffError(f"token {token!r} is too short: it would split ordinary words; try '<{low}>'")
        vocab = tokenizer.get_vocab() if tokenizer is not None else {}
        words = ordinary_words if ordinary_words is not None else _caption_words()
        if f"{low}</w>" in vocab or low in words or any(low in w for w in words):
            raise CdiffError(f"token {token!r} clashes with an ordinary word; try '<{low}>' or add a digit")
    return token


def _caption_words() -> set[str]:
    from cdiff_cli.captions import load_captions

    return {w for c in load_captions() for w in re.findall(r"[a-z]+", c.lower())}


def token_ids(tokenizer, tokens: list[str]) -> list[int]:
    """The single id of each token, or raise if a token is not one added token."""
    ids = []
    for tok in tokens:
        pieces = tokenizer(tok, add_special_tokens=False).input_ids
        if len(pieces) != 1:
            raise CdiffError(f"token {tok!r} is not a single token in this tokenizer")
        ids.append(int(pieces[0]))
    return ids


def initial_embedding(tokenizer, text_encoder, word: str) -> torch.Tensor:
    """Mean embedding of `word`'s sub-tokens (flat id list: see the transformers 5 note in method-notes)."""
    import torch

    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise CdiffError(f"cannot initialise a token from {word!r}: it has no tokens")
    table = text_encoder.get_input_embeddings().weight
    return table[torch.tensor(ids, device=table.device)].detach().float().mean(0).cpu()


def add_tokens(tokenizer, text_encoder, tokens: list[str], embeddings: torch.Tensor | None = None) -> list[int]:
    """Add tokens (if new) and, if given, set their embedding rows. Returns their ids."""
    import torch

    width = text_encoder.get_input_embeddings().weight.shape[1]
    if embeddings is not None and embeddings.shape[1] != width:  # checked first: a refusal changes nothing
        raise CdiffError(f"token embeddings are {embeddings.shape[1]}-wide but this base's text encoder is {width}-wide")
    vocab = tokenizer.get_vocab()
    for tok in tokens:
        if tok not in vocab and tok.lower() not in vocab:
            tokenizer.add_tokens(tok)
    emb = text_encoder.get_input_embeddings()
    if len(tokenizer) > emb.weight.shape[0]:
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = token_ids(tokenizer, tokens)
    if embeddings is not None:
        table = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[torch.tensor(ids, device=table.device)] = embeddings.to(table.device, table.dtype)
    return ids


def find_tokens(prompt: str, known: list[str]) -> list[str]:
    """Known tokens that occur in `prompt` (case-insensitive, as the tokenizer matches them)."""
    low = prompt.lower()
    return [t for t in known if canonical(t) in low]


_ANGLE_RE = re.compile(r"<[^<>\s]+>")


def angle_tokens(prompt: str) -> list[str]:
    """`<...>` words of a prompt: these must be concept tokens."""
    return _ANGLE_RE.findall(prompt)
