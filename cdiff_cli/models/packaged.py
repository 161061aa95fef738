"""The packaged `nano` models: a tiny text-to-image model (`--base nano`) and a tiny CLIP (`--clip nano`)
trained from scratch on the procedural world of `cdiff_cli.world` by `scripts/train_nano.py`.

    packaged_model("nano")       -> Path of the diffusers folder shipped in cdiff_cli/models/nano
    packaged_model("nano-clip")  -> Path of the CLIPModel folder shipped in cdiff_cli/models/nano-clip
"""

from __future__ import annotations

import json
from pathlib import Path

from cdiff_cli.testing.tiny import write_tiny_tokenizer

# Names a user may give (`--base nano`, `--clip nano`) -> folder under cdiff_cli/models.
BASE_NAMES = {"nano": "nano"}
CLIP_NAMES = {"nano": "nano-clip", "nano-clip": "nano-clip"}


def models_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("cdiff_cli") / "models"))


def packaged_model(folder: str) -> Path | None:
    """The packaged model folder `folder` ("nano", "nano-clip"), or None when it is not installed."""
    p = models_dir() / folder
    return p if (p / "config.json").is_file() or (p / "model_index.json").is_file() else None


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word (the algorithm of CLIPTokenizer.bpe)."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def write_word_tokenizer(folder: str | Path, words) -> Path:
    """`write_tiny_tokenizer(folder, words)`, then extra merges (appended, lowest priority) until every word of
    `words` is ONE token. The plain tiny tokenizer can split a word when an earlier word's merge takes
    priority ("green" after "red" gives g|re|e|n), so word-level prompts would not map to single embeddings."""
    folder = write_tiny_tokenizer(folder, tuple(words))
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    header, merges = lines[0], [m for m in lines[1:] if m]
    tokens = [t for t in sorted(vocab, key=vocab.get) if t not in ("<|startoftext|>", "<|endoftext|>")]
    known = set(tokens)
    ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    for word in words:
        while len(parts := _bpe(word, ranks)) > 1:
            a, b = parts[0], parts[1]
            ranks[(a, b)] = len(merges)
            merges.append(f"{a} {b}")
            if a + b not in known:
                known.add(a + b)
                tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join([header, *merges]) + "\n", encoding="utf-8")
    return folder
