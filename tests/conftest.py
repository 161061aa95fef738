"""Shared fixtures: tiny SD-1-like and SD-2-like bases built from configs, offline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from cdiff_cli.testing.tiny import build_tiny_pipeline, save_tiny_base  # noqa: E402

# Tiny models gain nothing from a second thread, and a spinning second thread slows them 5-10x
# whenever anything else uses the CPU.
torch.set_num_threads(1)

RES = 64  # tiny bases are 64 px (8x8 latents)


@pytest.fixture(scope="session")
def sd1_base(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("bases") / "sd1", "sd1")


@pytest.fixture(scope="session")
def sd2_base(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("bases") / "sd2", "sd2")


@pytest.fixture(scope="session")
def sdxl_base(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("bases") / "sdxl", "sdxl")


@pytest.fixture
def sd1_pipe():
    return build_tiny_pipeline("sd1")


def make_images(folder: Path, n: int = 4, colour=(255, 0, 0), size=(80, 64)) -> Path:
    """Non-square coloured shapes on varied backgrounds."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", size, (20 * i, 120, 200 - 20 * i))
        d = ImageDraw.Draw(im)
        d.ellipse((8 + 3 * i, 8, 48 + 3 * i, 48), fill=colour)
        im.save(folder / f"img{i}.png")
    return folder


@pytest.fixture
def cat_images(tmp_path) -> Path:
    return make_images(tmp_path / "cat", colour=(255, 0, 0))


@pytest.fixture
def chair_images(tmp_path) -> Path:
    return make_images(tmp_path / "chair", colour=(0, 0, 255), size=(64, 90))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "cdiff-home"
    monkeypatch.setenv("CDIFF_HOME", str(h))
    monkeypatch.delenv("CDIFF_BASE", raising=False)
    return h
