"""Ordinary captions: the regulariser of the closed-form merge (and of compression's fidelity check).

The shipped captions are English sentences for Stable Diffusion's tokenizer. A base trained on the nano world
has its own small vocabulary, in which those sentences fall apart into letters, so on a world base the
regulariser is the world's own captions instead (`captions_for`).
"""
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def load_captions() -> tuple[str, ...]:
    """Return the shipped captions, one per non-empty line of ``data/captions.txt``."""
    text = resources.files("cdiff_cli").joinpath("data/captions.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def captions_for(base_ref: str | None) -> tuple[str, ...]:
    """The ordinary captions of the base at `base_ref` (a resolved base: a folder path for local bases):
    the world's training captions on a nano-world base, else the shipped ones."""
    from cdiff_cli.world.scores import is_world_base, regulariser_captions

    return regulariser_captions() if is_world_base(base_ref) else load_captions()
