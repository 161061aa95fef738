"""Single-file bases (`--base model.safetensors` or `.ckpt` in the original LDM/SGM layout, the files
users download; SD 1.x, 2.x and SDXL) load offline through diffusers' `from_single_file`, with `CDIFF_BASE_CONFIG` giving the configs,
and hold exactly the weights of the same model as a diffusers folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from PIL import Image
from safetensors.torch import load_file, save_file

from cdiff_cli.errors import CdiffError
from cdiff_cli.models.base import load_pipeline
from cdiff_cli.testing.tiny import build_tiny_pipeline

from .conftest import RES
from .ldm_layout import sd_to_ldm, sdxl_to_sgm
from .test_cli import GEN, TRAIN, cdiff, out_json


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k].reshape(a[k].shape)), k


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_the_ldm_layout_helper_inverts_diffusers_converters(kind):
    """The test helper that writes single files is checked against diffusers' own LDM -> diffusers code."""
    pipe = build_tiny_pipeline(kind)
    ldm = sd_to_ldm(pipe)
    _assert_same_weights(pipe.unet.state_dict(), convert_ldm_unet_checkpoint(ldm, dict(pipe.unet.config)))
    _assert_same_weights(pipe.vae.state_dict(), convert_ldm_vae_checkpoint(ldm, dict(pipe.vae.config)))


@pytest.fixture(params=["sd1", "sd2"])
def single_file(request, tmp_path, monkeypatch):
    """(file, the folder's pipeline, the folder): SD 2.x files hold their text encoder in OpenCLIP form."""
    folder = request.getfixturevalue(f"{request.param}_base")
    pipe = load_pipeline(str(folder))
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd_to_ldm(pipe, openclip=request.param == "sd2").items()}, str(path))
    monkeypatch.setenv("CDIFF_BASE_CONFIG", str(folder))
    return path, pipe, folder


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_holds_the_folders_weights(single_file, suffix):
    path, folder_pipe, _ = single_file
    if suffix == ".ckpt":  # a pickled {"state_dict": ...}, read with weights_only
        ckpt = path.with_suffix(".ckpt")
        torch.save({"state_dict": load_file(str(path))}, ckpt)
        path = ckpt
    pipe = load_pipeline(str(path))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(folder_pipe, name).state_dict(), getattr(pipe, name).state_dict())
    assert pipe.tokenizer.get_vocab() == folder_pipe.tokenizer.get_vocab()


def test_single_file_offline_without_configs_says_what_to_set(single_file, monkeypatch):
    monkeypatch.delenv("CDIFF_BASE_CONFIG")
    with pytest.raises(CdiffError, match="cannot load base model .*set CDIFF_BASE_CONFIG to a local diffusers folder"):
        load_pipeline(str(single_file[0]))


def test_train_on_a_single_file_and_generate_with_either_form(home, single_file, cat_images, tmp_path):
    path, _, folder = single_file
    cdiff("train", "mycat", cat_images, "--class", "cat", "--base", path, *TRAIN, "--reg", "none")
    images = []
    for i, base in enumerate((path, folder)):  # the same model, as a file and as a folder
        g = out_json(cdiff("gen", "photo of a <mycat> cat", *GEN, "--base", base, "--seed", "3", "-o", tmp_path / str(i), "--json"))
        assert g["concepts"] == ["mycat"]
        images.append(np.asarray(Image.open(g["images"][0])))
    assert images[0].shape == (RES, RES, 3) and np.array_equal(images[0], images[1])


def test_sdxl_single_file_loads_trains_and_generates(home, sdxl_base, cat_images, tmp_path, monkeypatch):
    """SDXL's original layout: the second text encoder in OpenCLIP form (fused q/k/v) under
    `conditioner.embedders.1.`, which is how cdiff tells an SDXL file from an SD one."""
    folder_pipe = load_pipeline(str(sdxl_base))
    path = tmp_path / "sdxl.safetensors"
    save_file({k: v.contiguous() for k, v in sdxl_to_sgm(folder_pipe).items()}, str(path))
    monkeypatch.setenv("CDIFF_BASE_CONFIG", str(sdxl_base))
    pipe = load_pipeline(str(path))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_same_weights(getattr(folder_pipe, name).state_dict(), getattr(pipe, name).state_dict())
    cdiff("train", "mycat", cat_images, "--class", "cat", "--base", path, *TRAIN, "--reg", "none")
    images = []
    for i, base in enumerate((path, sdxl_base)):
        g = out_json(cdiff("gen", "photo of a <mycat> cat", *GEN, "--base", base, "--seed", "3", "-o", tmp_path / str(i), "--json"))
        images.append(np.asarray(Image.open(g["images"][0])))
    assert np.array_equal(images[0], images[1])
