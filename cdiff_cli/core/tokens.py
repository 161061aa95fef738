"""Modifier tokens: the grammar, adding them to a tokenizer, and finding them in prompts.

The grammar (`validate_token`, wherever a token enters: train, add, imported metadata and embedding
files): 1-40 printable ASCII characters, no spaces, commas, semicolons or quotes, at least one letter or
digit (punctuation alone would match every prompt that uses it), not a tokenizer's special token
(`<|endoftext|>` is the padding: loading it would change prompts without the token), and an all-letter
token must be neither short nor an ordinary word.

Tokens are added as single words (`AddedToken(single_word=True)`): `v1` matches in "a v1 cat" but not
inside "v10" or "cv1", and `find_tokens` matches prompts the same way, so the concepts a prompt loads are
the tokens the text encoder sees. CLIP tokenizers lower-case the text and match added tokens after that
normalisation, so `V1` and `v1` are the same token; tokens are compared case-insensitively everywhere.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from cdiff_cli.errors import CdiffError

if TYPE_CHECKING:
    import torch

_TOKEN_RE = re.compile(r"[!-~]{1,40}")  # printable ASCII: no spaces, no invisible or look-alike characters
_FORBIDDEN = set(",;\"'")


def canonical(token: str) -> str:
    return token.lower()



def shared_token(groups: list[list[str]]) -> tuple[str, int, int] | None:
    """The first token (compared as the tokenizer sees it) that two groups both hold, with the indices of the
    group that held it first and of the one holding it again; None when every token is in one group only.
    The merge refuses such groups: one token cannot stand for two concepts."""
    seen: dict[str, int] = {}
    for i, group in enumerate(groups):
        for t in group:
            if canonical(t) in seen:
                return t, seen[canonical(t)], i
            seen[canonical(t)] = i
    return None

def validate_token(token: str, tokenizer=None, ordinary_words: set[str] | None = None) -> str:
    """Refuse tokens that would be ambiguous in prompts; return the token unchanged if fine.

    An all-letter token that is an ordinary word (a whole-word entry of the tokenizer's vocabulary,
    or a word of the shipped captions) would hijack that word in every prompt, and a short all-letter
    token would split other words (`at` inside `cat`), so those are refused. Tokens with a digit or
    punctuation (`<mycat>`, `V1`) are safe.
    """
    if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token) or _FORBIDDEN & set(token):
        raise CdiffError(f"invalid token {token!r}: use 1-40 printable ASCII characters without spaces, commas, "
                         "semicolons or quotes")
    if not any(c.isalnum() for c in token):
        raise CdiffError(f"invalid token {token!r}: it needs a letter or a digit (punctuation alone would match "
                         "every prompt that uses it)")
    specials = set(getattr(tokenizer, "all_special_tokens", None) or [])
    if "<|" in token or "|>" in token or token in specials or canonical(token) in {canonical(t) for t in specials}:
        raise CdiffError(f"invalid token {token!r}: it is (or looks like) one of the tokenizer's special tokens")
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
    from cdiff_cli.merging.captions import load_captions

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
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    for tok in tokens:
        if tok not in vocab and tok.lower() not in vocab:
            tokenizer.add_tokens(AddedToken(tok, single_word=True))  # never inside another word (module doc)
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
    """Known tokens that occur in `prompt` as words of their own (case-insensitive), as the tokenizer matches
    tokens added as single words: `v1` is in "a v1 cat" and "(v1)" but not in "v10" or "cv1"."""
    low = prompt.lower()
    return [t for t in known if re.search(rf"(?<!\w){re.escape(canonical(t))}(?!\w)", low)]


def tokens_past_limit(tokenizer, prompt: str, tokens: list[str]) -> list[str]:
    """Tokens of `prompt` that fall past the text encoder's window (77 tokens for CLIP): the encoder never
    sees them, and diffusers drops them with a warning cdiff's output would hide."""
    limit = int(getattr(tokenizer, "model_max_length", 77) or 77)
    ids = tokenizer(prompt, add_special_tokens=True, truncation=False).input_ids
    if len(ids) <= limit:
        return []
    kept = set(ids[: limit - 1])  # the last place is the end-of-text token
    return [t for t, i in zip(tokens, token_ids(tokenizer, tokens)) if i in ids and i not in kept]


_ANGLE_RE = re.compile(r"<[^<>\s]+>")


def angle_tokens(prompt: str) -> list[str]:
    """`<...>` words of a prompt: these must be concept tokens."""
    return _ANGLE_RE.findall(prompt)
