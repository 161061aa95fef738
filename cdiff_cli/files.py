"""Writing files as the user expects them: with the permissions their umask gives.

safetensors' `save_file` creates its files 0600 whatever the umask, so a ComfyUI or webui running as
another user could not read an export; `tempfile.mkdtemp` makes folders 0700 likewise.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask (reading it means setting it: put it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_as_umask(path: str | Path, folder: bool = False) -> None:
    """Give `path` the mode a plain open() or mkdir() would have given it under the current umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with the umask's permissions."""
    from safetensors.torch import save_file  # torch: not at import time (the CLI starts without it)

    save_file(tensors, str(path), metadata=metadata)
    share_as_umask(path)
