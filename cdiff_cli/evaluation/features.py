"""Feature extractors for `cdiff eval`: CLIP (images and texts) and DINO (images), loaded from a hub
id or a local folder, run in batches. Features come back as float32 numpy arrays, one row per input.

Only PIL-based processors are needed: without torchvision, transformers 5 falls back from
`CLIPImageProcessor` / `ViTImageProcessor` to their `...Pil` twins, which give the same tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cdiff_cli.defaults import DEFAULT_CLIP, PAPER_DINO  # noqa: E402,F401  (re-exported)
from cdiff_cli.errors import CdiffError, first_line
from cdiff_cli.progress import Task

FEATURE_BATCH = 32


def _check_ref(ref: str, what: str) -> str:
    if what == "CLIP":
        from cdiff_cli.models.packaged import CLIP_NAMES, packaged_model

        if ref in CLIP_NAMES:  # `--clip nano`: the CLIP shipped with cdiff, trained on the nano world
            folder = packaged_model(CLIP_NAMES[ref])
            if folder is None:
                raise CdiffError(f"the packaged {CLIP_NAMES[ref]!r} model is not installed (no cdiff_cli/models/"
                                 f"{CLIP_NAMES[ref]}); train it with scripts/train_nano.py or pass --clip with another model")
            return str(folder.resolve())
    p = Path(ref).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CdiffError(f"{what} folder {p} has no config.json (save one with save_pretrained)")
        return str(p.resolve())
    if p.exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise CdiffError(f"{what} model not found: {ref} (give a hub id or a folder saved with save_pretrained)")
    return ref


def _load_error(ref: str, what: str, option: str, e: Exception) -> CdiffError:
    first = first_line(e)
    hint = ""
    if not Path(ref).is_dir() and (os.environ.get("HF_HUB_OFFLINE") or any(
            w in first.lower() for w in ("offline", "connect", "resolve", "internet", "network"))):
        hint = f" (the hub is unreachable: pass {option} with a local folder holding the model)"
    return CdiffError(f"cannot load {what} model {ref}: {first}{hint}")


def _output_tensor(out) -> torch.Tensor:
    # transformers 4 returns the projected features; transformers 5 a ModelOutput whose pooler_output holds them.
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "pooler_output", None) is not None:
        return out.pooler_output
    return out[0]


@dataclass
class ClipScorer:
    """A CLIP model and its processor: `images(list[PIL])` and `texts(list[str])` -> [n, d] features."""

    ref: str
    model: object
    processor: object
    tokenizer: object
    device: torch.device
    batch: int = FEATURE_BATCH

    def images(self, images, task: Task | None = None) -> np.ndarray:
        return _image_features(self, images, task, lambda pix: _output_tensor(self.model.get_image_features(pixel_values=pix)))

    @torch.no_grad()
    def texts(self, texts: list[str]) -> np.ndarray:
        limit = min(int(getattr(self.tokenizer, "model_max_length", 77) or 77),
                    int(self.model.config.text_config.max_position_embeddings))
        rows = []
        for s in range(0, len(texts), self.batch):
            enc = self.tokenizer(list(texts[s : s + self.batch]), padding=True, truncation=True, max_length=limit,
                                 return_tensors="pt")
            out = self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                               attention_mask=enc["attention_mask"].to(self.device))
            rows.append(_output_tensor(out).float().cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, 1), np.float32)


@dataclass
class DinoScorer:
    """A ViT (DINO) model: `images(list[PIL])` -> [n, d] CLS embeddings of the last layer."""

    ref: str
    model: object
    processor: object
    device: torch.device
    batch: int = FEATURE_BATCH

    def images(self, images, task: Task | None = None) -> np.ndarray:
        return _image_features(self, images, task, lambda pix: self.model(pixel_values=pix).last_hidden_state[:, 0])


@torch.no_grad()
def _image_features(scorer, images, task: Task | None, embed) -> np.ndarray:
    """Batches of PIL images through the scorer's processor and `embed(pixel_values) -> [b, d]`."""
    rows = []
    for s in range(0, len(images), scorer.batch):
        chunk = [im.convert("RGB") for im in images[s : s + scorer.batch]]
        pix = scorer.processor(images=chunk, return_tensors="pt")["pixel_values"]
        rows.append(embed(pix.to(scorer.device, scorer.model.dtype)).float().cpu().numpy())
        if task is not None:
            task.advance(len(chunk))
    return np.concatenate(rows) if rows else np.zeros((0, 1), np.float32)


def load_clip(ref: str | None = None, device: torch.device | str = "cpu") -> ClipScorer:
    """CLIPModel + its processor (AutoProcessor; else AutoImageProcessor + AutoTokenizer)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, CLIPModel

    ref = _check_ref(ref or DEFAULT_CLIP, "CLIP")
    try:
        model = CLIPModel.from_pretrained(ref)
    except Exception as e:
        raise _load_error(ref, "CLIP", "--clip", e) from e
    try:
        processor = AutoProcessor.from_pretrained(ref)
        image_proc = getattr(processor, "image_processor", None)
        tokenizer = getattr(processor, "tokenizer", None)
        if image_proc is None or tokenizer is None:
            raise ValueError("the processor lacks an image processor or a tokenizer")
    except Exception:
        try:
            image_proc = AutoImageProcessor.from_pretrained(ref)
            tokenizer = AutoTokenizer.from_pretrained(ref)
        except Exception as e:
            raise _load_error(ref, "CLIP processor of the", "--clip", e) from e
    model.eval().to(device)
    return ClipScorer(ref, model, image_proc, tokenizer, torch.device(device))


def load_dino(ref: str, device: torch.device | str = "cpu") -> DinoScorer:
    """A ViT-family image model (AutoModel) and its AutoImageProcessor; the CLS embedding is the feature."""
    from transformers import AutoImageProcessor, AutoModel

    ref = _check_ref(ref, "DINO")
    try:
        model = AutoModel.from_pretrained(ref)
    except Exception as e:
        raise _load_error(ref, "DINO", "--dino", e) from e
    try:
        processor = AutoImageProcessor.from_pretrained(ref)
    except Exception as e:
        raise _load_error(ref, "DINO image processor of the", "--dino", e) from e
    if not hasattr(model, "forward") or getattr(model.config, "model_type", "") in ("clip", "clip_text_model"):
        raise CdiffError(f"{ref} is not an image model (model type {model.config.model_type!r})")
    model.eval().to(device)
    return DinoScorer(ref, model, processor, torch.device(device))
