"""Loading a base in another precision tensor by tensor from its files (`cdiff_cli.models.loading`): the same
weights as diffusers' own cast, none of them left mapped from the file, and untrusted headers checked."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from cdiff_cli.errors import CdiffError
from cdiff_cli.models.base import WEIGHTED_COMPONENTS, load_pipeline
from cdiff_cli.models.loading import (
    UnreadableTensors,
    _floating_tensors,
    cast_from_files,
    read_index,
    read_tensor,
    stored_dtype,
)


def test_read_tensor_returns_what_safetensors_loads(tmp_path):
    tensors = {"f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 2, 2).bfloat16(),
               "i64": torch.arange(6).reshape(2, 3), "bool": torch.tensor([True, False, True]),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"a": "b"})
    index = read_index(path)
    assert set(index) == set(tensors)
    with open(path, "rb") as f:
        got = {k: read_tensor(f, t) for k, t in index.items()}
    want = load_file(str(path))
    for k in tensors:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert stored_dtype(tmp_path) is None  # mixed floating dtypes
    save_file({"a": torch.ones(2).half(), "b": torch.ones(3).half()}, str(tmp_path / "t.safetensors"))
    assert stored_dtype(tmp_path) == torch.float16


def _write(path, header: dict, data: bytes, declared_len: int | None = None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if declared_len is None else declared_len) + raw + data)
    return path


@pytest.mark.parametrize("header, data, declared, why", [
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None, "outside the file"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16, None, "do not match its shape"),
    ({"x": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 0]}}, b"", None, "do not match its shape"),
    ({"x": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0", None, "bad header entry"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, b"\0" * 8, None, "do not match"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, 10**9, "impossible"),
])
def test_headers_that_lie_about_their_contents_are_refused(tmp_path, header, data, declared, why):
    path = _write(tmp_path / "bad.safetensors", header, data, declared)
    with pytest.raises(UnreadableTensors, match=why):
        read_index(path)


def test_a_header_that_is_not_json_is_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(UnreadableTensors, match="not JSON"):
        read_index(path)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_a_base_loaded_in_bf16_equals_diffusers_cast_and_keeps_nothing_mapped(arch, sd1_base, sdxl_base):
    """Every floating tensor is read from the files (none converted from the mapped fp32 copy), and the
    weights are bit for bit those diffusers' own `from_pretrained(dtype=bf16)` gives."""
    from diffusers import DiffusionPipeline

    folder = sd1_base if arch == "sd1" else sdxl_base
    ours = load_pipeline(str(folder), dtype=torch.bfloat16)
    theirs = DiffusionPipeline.from_pretrained(str(folder), dtype=torch.bfloat16)
    seen = 0
    for c in WEIGHTED_COMPONENTS:
        if not (folder / c).is_dir():
            continue
        seen += 1
        assert stored_dtype(folder / c) == torch.float32
        a, b = getattr(ours, c).state_dict(), getattr(theirs, c).state_dict()
        assert set(a) == set(b)
        for k in b:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (c, k)
        # read again from fp32: every floating tensor comes from the file
        fresh = DiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
        module = getattr(fresh, c)
        assert cast_from_files(module, folder / c, torch.bfloat16) == len(list(_floating_tensors(module)))
    assert seen == (4 if arch == "sdxl" else 3)


def test_fp32_load_of_an_fp32_folder_keeps_the_weights_as_stored(sd1_base):
    pipe = load_pipeline(str(sd1_base), dtype=torch.float32)
    want = load_file(str(sd1_base / "unet" / "diffusion_pytorch_model.safetensors"))
    got = pipe.unet.state_dict()
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in want)


def test_a_damaged_weight_file_is_one_clear_error(tmp_path, sd1_base):
    import shutil

    folder = tmp_path / "base"
    shutil.copytree(sd1_base, folder)
    f = folder / "vae" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])  # truncated
    with pytest.raises(CdiffError, match="cannot load base model"):
        load_pipeline(str(folder), dtype=torch.bfloat16)


def test_variant_files_beside_the_weights_are_not_read(tmp_path):
    from cdiff_cli.models.loading import weight_files

    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "model-00001-of-00002.safetensors", "model.fp16-00001-of-00002.safetensors", "config.json"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in weight_files(tmp_path)] == ["diffusion_pytorch_model.safetensors",
                                                        "model-00001-of-00002.safetensors"]
