"""LoRA export: the low-rank math, the kohya-style layout, and a round trip through tools that are not
cdiff (diffusers' load_lora_weights + load_textual_inversion reproduce `cdiff gen`)."""

import json

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from cdiff_cli.cli import app
from cdiff_cli.core.delta import Delta
from cdiff_cli.core.lowrank import choose_rank, factorize, relative_error
from cdiff_cli.errors import CdiffError
from cdiff_cli.formats.lora import export_lora, kv_updates, lora_module, read_lora

from .conftest import RES

runner = CliRunner()


# --------------------------------------------------------------------------- the math


def test_choose_rank_by_count_and_by_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1, 0 of 14
    assert choose_rank(s, rank=2) == 2
    assert choose_rank(s, rank=10) == 4
    assert choose_rank(s, energy=9 / 14) == 1
    assert choose_rank(s, energy=0.7) == 2
    assert choose_rank(s, energy=1.0) == 3  # the zero singular value adds nothing
    with pytest.raises(ValueError):
        choose_rank(s)
    with pytest.raises(ValueError):
        choose_rank(s, energy=1.5)


def test_factorize_is_exact_at_full_rank_and_optimal_when_truncated():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=g)
    up, down = factorize(w, energy=1.0)
    assert up.shape == (40, 24) and down.shape == (24, 24)
    assert relative_error(w, up, down) < 1e-6
    # Truncated: the error is exactly the energy of the dropped singular values (Eckart-Young).
    s = torch.linalg.svdvals(w.double())
    up, down = factorize(w, rank=5)
    expected = float(s[5:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
    assert relative_error(w, up, down) == pytest.approx(expected, rel=1e-5)
    # A rank-3 update is recovered exactly at rank 3.
    low = torch.randn(40, 3, generator=g) @ torch.randn(3, 24, generator=g)
    up, down = factorize(low, energy=0.999999)
    assert up.shape[1] == 3 and relative_error(low, up, down) < 1e-6


def test_lora_module_names_follow_kohya():
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert lora_module(name) == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def _toy_delta(unet, scale=0.05, mode="kv"):
    g = torch.Generator().manual_seed(1)
    params = dict(unet.named_parameters())
    names = [n for n in params if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
    weights = {n: params[n].detach().clone() + scale * torch.randn(params[n].shape, generator=g) for n in names}
    return Delta(weights, ["<a>"], torch.randn(1, 32, generator=g), mode)


def test_export_then_read_recovers_the_weights(sd1_pipe, tmp_path):
    unet = sd1_pipe.unet
    delta = _toy_delta(unet)
    base = dict(unet.named_parameters())
    files, stats = export_lora(delta, base, tmp_path, "toy", dtype=torch.float32)
    assert stats["max_relative_error"] < 1e-5
    weights = read_lora(files[0], base)
    assert set(weights) == set(delta.weights)
    for n, w in weights.items():
        torch.testing.assert_close(w, delta.weights[n], atol=1e-5, rtol=1e-5)
    # The webui/ComfyUI embedding layout: one key, shape [1, dim].
    with safe_open(str(tmp_path / "embeddings" / "a.safetensors"), "pt") as f:
        assert list(f.keys()) == ["emb_params"]
        torch.testing.assert_close(f.get_tensor("emb_params"), delta.embeddings)
    with safe_open(str(files[0]), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["ss_network_module"] == "networks.lora" and json.loads(meta["cdiff_tokens"]) == ["<a>"]
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha")) for k in keys)


def test_truncated_export_keeps_the_requested_energy(sd1_pipe, tmp_path):
    unet = sd1_pipe.unet
    delta = _toy_delta(unet)
    base = dict(unet.named_parameters())
    _, full = export_lora(delta, base, tmp_path / "full", "toy")
    _, half = export_lora(delta, base, tmp_path / "half", "toy", energy=0.5)
    assert half["max_rank"] < full["max_rank"] and half["bytes"] < full["bytes"]
    assert half["max_relative_error"] <= np.sqrt(0.5) + 1e-3  # dropped energy <= 50 % -> error <= sqrt(0.5)


def test_lora_export_refuses_crossattn_updates(sd1_pipe):
    unet = sd1_pipe.unet
    delta = _toy_delta(unet)
    q = next(n for n, _ in unet.named_parameters() if n.endswith("attn2.to_q.weight"))
    delta.weights[q] = dict(unet.named_parameters())[q].detach().clone()
    with pytest.raises(CdiffError, match="k/v updates only"):
        kv_updates(delta, dict(unet.named_parameters()))


def test_read_lora_refuses_other_targets(sd1_pipe, tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.zeros(4, 1),
               "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(1, 4)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CdiffError, match="only LoRAs of cross-attention k/v"):
        read_lora(tmp_path / "x.safetensors", dict(sd1_pipe.unet.named_parameters()))


# --------------------------------------------------------------------------- through diffusers


def test_lora_export_loaded_by_diffusers_reproduces_cdiff_gen(home, sd1_base, cat_images, tmp_path):
    args = ["--base", str(sd1_base), "--steps", "8", "--batch-size", "2", "--resolution", str(RES), "--reg", "none",
            "--device", "cpu", "--lr", "5e-3", "--precision", "fp32"]
    r = runner.invoke(app, ["train", "mycat", str(cat_images), "--class", "cat", *args])
    assert r.exit_code == 0, r.output
    prompt = "photo of a <mycat> cat"
    gen = ["-n", "2", "--steps", "4", "--seed", "5", "--height", str(RES), "--width", str(RES), "--device", "cpu"]
    r = runner.invoke(app, ["gen", prompt, *gen, "-o", str(tmp_path / "gen"), "--json"])
    assert r.exit_code == 0, r.output
    cdiff_images = np.stack([np.asarray(Image.open(p)) for p in json.loads(r.stdout)["images"]]).astype(float)
    r = runner.invoke(app, ["export", "mycat", "-o", str(tmp_path / "lora"), "--format", "lora", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["max_relative_error"] < 2e-3  # fp16 factors

    # --- the README recipe: diffusers only, nothing from cdiff ---
    pipe = StableDiffusionPipeline.from_pretrained(str(sd1_base), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

    def run(p):
        return np.stack(pipe(p, num_images_per_prompt=2, num_inference_steps=4, guidance_scale=6.0, height=RES, width=RES,
                             output_type="np", generator=[torch.Generator("cpu").manual_seed(5 + i) for i in range(2)]).images) * 255

    pipe.load_textual_inversion(str(tmp_path / "lora" / "embeddings" / "mycat.safetensors"), token="<mycat>")
    token_only = run(prompt)  # the token alone, the base's k/v
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name="mycat.safetensors")
    theirs = run(prompt)
    gap = np.abs(theirs - cdiff_images).mean()
    without_lora = np.abs(token_only - cdiff_images).mean()
    print(f"mean |diffusers+LoRA - cdiff| {gap:.3f} levels; without the LoRA {without_lora:.3f}")
    assert gap < 0.5  # fp16 factors and uint8 rounding
    assert without_lora > 10 * gap  # the LoRA is what makes the difference


# --------------------------------------------------------------------------- importing


def test_lora_export_imports_back_into_the_registry(home, sd1_base, cat_images, tmp_path):
    from cdiff_cli.registry import Registry

    args = ["--base", str(sd1_base), "--steps", "4", "--batch-size", "2", "--resolution", str(RES), "--reg", "none",
            "--device", "cpu", "--lr", "5e-3"]
    assert runner.invoke(app, ["train", "mycat", str(cat_images), "--class", "cat", *args]).exit_code == 0
    r = runner.invoke(app, ["export", "mycat", "-o", str(tmp_path / "lora"), "--format", "lora"])
    assert r.exit_code == 0, r.output
    original = Registry().get("mycat").load_delta()

    # The export folder: tokens from its manifest.
    r = runner.invoke(app, ["add", "back", str(tmp_path / "lora"), "--base", str(sd1_base), "--token", "<back>", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["format"] == "lora"
    back = Registry().get("back").load_delta()
    assert back.tokens == ["<back>"] and set(back.weights) == set(original.weights)
    for n, w in back.weights.items():
        torch.testing.assert_close(w, original.weights[n], atol=2e-3, rtol=2e-3)  # fp16 factors
    torch.testing.assert_close(back.embeddings, original.embeddings)

    # A bare LoRA file with a webui embedding file: the token is named after the file.
    r = runner.invoke(app, ["add", "bare", str(tmp_path / "lora" / "mycat.safetensors"), "--base", str(sd1_base),
                            "--embedding", str(tmp_path / "lora" / "embeddings" / "mycat.safetensors"), "--token", "<bare>"])
    assert r.exit_code == 0, r.output
    assert Registry().get("bare").tokens == ["<bare>"]


def test_bare_lora_without_embeddings_is_refused(home, sd1_base, sd1_pipe, tmp_path):
    from safetensors.torch import save_file

    name = next(n for n, _ in sd1_pipe.unet.named_parameters() if n.endswith("attn2.to_k.weight"))
    w = dict(sd1_pipe.unet.named_parameters())[name]
    key = lora_module(name)
    (tmp_path / "solo").mkdir()
    save_file({f"{key}.lora_up.weight": torch.zeros(w.shape[0], 1), f"{key}.lora_down.weight": torch.zeros(1, w.shape[1])},
              str(tmp_path / "solo" / "x.safetensors"))
    r = runner.invoke(app, ["add", "solo", str(tmp_path / "solo" / "x.safetensors"), "--base", str(sd1_base)])
    assert r.exit_code == 1
    assert "--embedding" in r.stderr and "Traceback" not in r.output
    from cdiff_cli.registry import Registry

    assert not Registry().exists("solo") and Registry().entries() == []


def test_merged_entry_exports_one_lora_with_every_token(home, sd1_base, cat_images, chair_images, tmp_path):
    args = ["--base", str(sd1_base), "--steps", "3", "--batch-size", "2", "--resolution", str(RES), "--reg", "none", "--device", "cpu"]
    assert runner.invoke(app, ["train", "mycat", str(cat_images), "--class", "cat", *args]).exit_code == 0
    assert runner.invoke(app, ["train", "mychair", str(chair_images), "--class", "chair", *args]).exit_code == 0
    assert runner.invoke(app, ["merge", "mycat", "mychair"]).exit_code == 0
    r = runner.invoke(app, ["export", "mycat+mychair", "--format", "lora", "--energy", "0.9", "-o", str(tmp_path / "m"), "--json"])
    assert r.exit_code == 0, r.output
    files = [p.split("/")[-1] for p in json.loads(r.stdout)["files"]]
    assert files == ["mycat+mychair.safetensors", "mycat.safetensors", "mychair.safetensors", "cdiff_lora.json", "cdiff_base.json"]
    r = runner.invoke(app, ["export", "mycat", "--format", "diffusers", "--rank", "2", "-o", str(tmp_path / "x")])
    assert r.exit_code == 1 and "--format lora only" in r.stderr
    for bad in (["--rank", "0"], ["--energy", "0"], ["--rank", "2", "--energy", "0.9"]):
        r = runner.invoke(app, ["export", "mycat", "--format", "lora", *bad, "-o", str(tmp_path / "y")])
        assert r.exit_code == 1 and r.stderr.startswith("error:") and "Traceback" not in r.output, bad
    assert not (tmp_path / "y").exists()
