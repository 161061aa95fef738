"""Ordinary captions shipped with cdiff (the regulariser of the closed-form merge)."""
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def load_captions() -> tuple[str, ...]:
    """Return the shipped captions, one per non-empty line of ``data/captions.txt``."""
    text = resources.files("cdiff_cli").joinpath("data/captions.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())
