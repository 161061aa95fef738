"""Tools for testing cdiff without real model weights.

- `tiny`: tiny random Stable-Diffusion-shaped pipelines (SD 1.x, SD 2.x, SDXL) built from configs, and the
  tiny tokenizers they use; `python -m cdiff_cli.testing.tiny DIR [sd1|sd2|sdxl]` writes one as a local
  diffusers folder (usable as `--base DIR`).
It imports nothing else from cdiff.
"""
