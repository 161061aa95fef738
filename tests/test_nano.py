"""The packaged nano models (cdiff_cli/models): `--base nano` and `--clip nano` load offline, are small, run,
and nano-clip has really learned the world."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cdiff_cli import world as W
from cdiff_cli.errors import CdiffError
from cdiff_cli.models.base import load_pipeline, resolve_base
from cdiff_cli.models.packaged import models_dir, packaged_model

MAX_MB = 25


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def nano_pipe():
    return load_pipeline("nano")


@pytest.fixture(scope="module")
def nano_clip():
    from cdiff_cli.evaluation.features import load_clip

    return load_clip("nano")


def test_the_models_are_shipped_and_small():
    nano, clip = packaged_model("nano"), packaged_model("nano-clip")
    assert nano is not None and (nano / "model_index.json").is_file()
    assert clip is not None and (clip / "config.json").is_file() and (clip / "preprocessor_config.json").is_file()
    assert nano.parent == clip.parent == models_dir()
    assert folder_bytes(nano) + folder_bytes(clip) <= MAX_MB * 2**20
    # Only safetensors weights: nothing that needs pickle.
    assert not [p for p in models_dir().rglob("*") if p.suffix in (".bin", ".pt", ".ckpt", ".pkl")]


def test_nano_says_it_draws_the_world_and_how_it_was_trained():
    from cdiff_cli.world.scores import WORLD_MARKER, is_world_base, world_marker

    nano = packaged_model("nano")
    assert is_world_base(str(nano)) and not is_world_base(str(packaged_model("nano-clip")))
    assert json.loads((nano / WORLD_MARKER).read_text()) == world_marker()
    history = json.loads((nano / "training.json").read_text())
    assert history and all("args" in run and "stages" in run for run in history)
    assert sum(run["stages"].get("unet", {}).get("steps", 0) for run in history) > 1000  # a decoder-only run has none


def test_base_nano_resolves_to_the_packaged_folder(tmp_path, monkeypatch):
    spec = resolve_base("nano")
    assert spec.kind == "folder" and Path(spec.ref) == packaged_model("nano").resolve()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nano").mkdir()  # a local folder of that name does not shadow the packaged model
    assert resolve_base("nano").ref == spec.ref
    with pytest.raises(CdiffError, match="no model_index.json"):
        resolve_base("./nano")


def test_nano_loads_offline_in_fp32_and_samples(nano_pipe):
    from diffusers import DPMSolverMultistepScheduler

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    pipe = nano_pipe
    assert pipe.unet.dtype == torch.float32 and pipe.vae.dtype == torch.float32
    assert pipe.text_encoder.dtype == torch.float32
    assert sum(n.endswith("attn2.to_k.weight") for n, _ in pipe.unet.named_parameters()) >= 4
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    # v-prediction on a zero-terminal-SNR schedule: sampling starts from noise that holds nothing of an image.
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.timestep_spacing == "trailing"
    assert float(pipe.scheduler.alphas_cumprod[-1]) < 1e-6
    tok = pipe.tokenizer
    assert all(len(tok(w, add_special_tokens=False)["input_ids"]) == 1 for w in W.WORDS)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    out = pipe("a big red square in the middle, on a gray background", num_inference_steps=6, guidance_scale=6.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    img = out.images[0]
    assert img.shape == (64, 64, 3) and np.isfinite(img).all()
    assert img.std() > 0.02  # a picture, not a flat field


def test_nano_text_encoder_is_trained_with_the_unet(nano_pipe, nano_clip):
    """The base's text encoder keeps nano-clip's tokenizer, vocabulary and width (so nano-clip and the oracle
    read the same words) but is its own: trained jointly with the UNet, its token embeddings have moved away
    from the contrastive tower it started from."""

    te, tower = nano_pipe.text_encoder, nano_clip.model.text_model
    assert (te.config.hidden_size, te.config.vocab_size) == (nano_clip.model.config.text_config.hidden_size,
                                                             nano_clip.model.config.text_config.vocab_size)
    a = te.get_input_embeddings().weight.detach().float()
    b = tower.embeddings.token_embedding.weight.detach().float()
    assert a.shape == b.shape
    assert float((a - b).norm() / b.norm()) > 0.05  # shipped: 0.19


def _swap_colour(spec):
    obj = spec.objects[0]
    other = next(c for c in W.COLOURS if c not in (obj.colour, spec.background))
    from dataclasses import replace

    return replace(spec, objects=(replace(obj, colour=other),) + spec.objects[1:])


def _swap_kind(spec):
    from dataclasses import replace

    obj = spec.objects[0]
    other = W.KINDS[(W.KINDS.index(obj.kind) + 3) % len(W.KINDS)]
    return replace(spec, objects=(replace(obj, kind=other),) + spec.objects[1:])


def test_nano_clip_knows_the_world(nano_clip):
    """On world scenes it never trained on, the true caption beats the same caption with the colour, or the
    kind, of the first object changed, far more often than chance."""
    from cdiff_cli.evaluation.metrics import normalize

    specs = [s for s in W.dataset_specs(60, seed=4242, n_objects=1, caption_variety=False)
             if s.objects[0].colour in W.COLOURS][:48]  # captions name the colour
    images = [W.render(s) for s in specs]
    img = normalize(nano_clip.images(images))
    true = normalize(nano_clip.texts([W.caption(s) for s in specs]))
    # Chance is 0.5; nano-clip is sure of colours, less of kinds (small shapes at 64 px, a short training).
    for swap, floor in ((_swap_colour, 0.9), (_swap_kind, 0.6)):
        wrong = normalize(nano_clip.texts([W.caption(swap(s)) for s in specs]))
        wins = ((img * true).sum(1) > (img * wrong).sum(1)).mean()
        assert wins >= floor, (swap.__name__, wins)
    # And retrieval among the 48 scenes is far above chance (1/48).
    assert ((img @ true.T).argmax(1) == np.arange(len(specs))).mean() >= 0.5


def test_eval_clip_nano_resolves(nano_clip):
    assert Path(nano_clip.ref) == packaged_model("nano-clip").resolve()
    assert nano_clip.images([W.render(W.dataset_specs(1, seed=0)[0])]).shape[0] == 1


def test_zero_snr_base_refuses_a_scheduler_that_would_drop_its_schedule(nano_pipe):
    from types import SimpleNamespace

    from cdiff_cli.generation import set_scheduler

    pipe = SimpleNamespace(scheduler=nano_pipe.scheduler)  # set_scheduler only swaps .scheduler
    with pytest.raises(CdiffError, match="zero-terminal-SNR.*choose one of dpm"):
        set_scheduler(pipe, "pndm")
    for name in ("dpm", "ddim", "euler", "unipc"):
        set_scheduler(pipe, name)
        assert pipe.scheduler.config.rescale_betas_zero_snr
        pipe.scheduler.set_timesteps(10)
        assert int(pipe.scheduler.timesteps[0]) == 999  # trailing spacing starts at the noisiest step


def test_gen_uses_the_bases_own_guidance_unless_asked(tmp_path, monkeypatch, sd1_base):
    """Without --guidance, `cdiff gen` samples nano at 3 (where it follows its prompts best) and other bases
    at 6; an explicit value wins. The PNGs record what was used."""
    import json as _json

    from PIL import Image
    from typer.testing import CliRunner

    from cdiff_cli.cli import app

    monkeypatch.setenv("CDIFF_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    for base, extra, want in (("nano", [], 3.0), ("nano", ["--guidance", "5"], 5.0), (str(sd1_base), [], 6.0)):
        r = runner.invoke(app, ["gen", "a red circle", "--base", base, "--steps", "2", "--device", "cpu",
                                "-o", str(tmp_path / "out"), "--json", *extra])
        assert r.exit_code == 0, r.output
        png = _json.loads(r.stdout)["images"][0]
        assert _json.loads(Image.open(png).text["parameters"])["guidance"] == want, base
