"""scripts/train_nano.py at toy size: it exports a world model cdiff recognises, and a second run trains on
from the first one's exported weights (--init-from) and records both runs."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_nano.py"
TOY = ["--data", "600",  # the CLIP stage holds out the last 512 scenes
        "--threads", "1", "--clip-steps", "2", "--clip-batch", "8", "--clip-hidden", "32",
       "--clip-layers", "1", "--vae-steps", "2", "--vae-batch", "4", "--vae-channels", "8", "8", "8",
       "--unet-steps", "3", "--unet-batch", "4", "--unet-channels", "16", "32", "--unet-layers", "1",
       "--preview-every", "0", "--stages", "clip,vae,unet,export"]


def _script():
    spec = importlib.util.spec_from_file_location("train_nano", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> Path:
    """One toy run from scratch, shared by the tests that train on from it."""
    folder = tmp_path_factory.mktemp("train_nano") / "first"
    _script().main(["--out", str(folder), *TOY])
    return folder


def _unet(folder: Path) -> dict:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(folder / "nano" / "unet")).state_dict()


def test_train_nano_exports_and_trains_on_from_its_export(tmp_path, first):
    from cdiff_cli.world.scores import is_world_base

    T = _script()
    second = tmp_path / "second"
    assert is_world_base(str(first / "nano"))
    history = json.loads((first / "nano" / "training.json").read_text())
    assert len(history) == 1 and history[0]["stages"]["unet"]["steps"] == 3

    # The shipped layout: nano/ and nano-clip/ side by side.
    T.main(["--out", str(second), "--init-from", str(first), *TOY])
    history = json.loads((second / "nano" / "training.json").read_text())
    assert len(history) == 2 and history[1]["args"]["init_from"] == str(first)
    assert "from" in history[1]["stages"]["clip"] and "from" in history[1]["stages"]["vae"]
    a, b = _unet(first), _unet(second)
    # Trained on for 3 steps from the first run's weights: close to them, not equal.
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert 0 < diff < 0.05
    clip_a = json.loads((first / "nano-clip" / "config.json").read_text())
    clip_b = json.loads((second / "nano-clip" / "config.json").read_text())
    assert clip_a["text_config"]["hidden_size"] == clip_b["text_config"]["hidden_size"]
    assert torch.equal(*(torch.load(p / "ckpt" / "vae.pt", weights_only=True)["model"]["encoder.conv_in.weight"]
                         .half() for p in (first, second)))


def _vae(folder: Path) -> dict:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(folder / "nano" / "vae")).state_dict()


def test_decoder_stage_trains_the_decoder_and_keeps_latents_and_unet(tmp_path, first):
    T = _script()
    third = tmp_path / "third"
    T.main(["--out", str(third), "--init-from", str(first), *TOY[:-1], "decoder,export",
            "--decoder-steps", "3", "--decoder-data", "300"])
    a, b = _vae(first), _vae(third)
    encoder = [k for k in a if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in a if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and decoder
    # The latent space is the UNet's input: the encoder stays bit-identical, the decoder trains.
    assert all(torch.equal(a[k], b[k]) for k in encoder)
    assert any(not torch.equal(a[k], b[k]) for k in decoder)
    ua, ub = _unet(first), _unet(third)
    assert all(torch.equal(ua[k], ub[k]) for k in ua)  # no unet stage: taken as it is
    stage = json.loads((third / "nano" / "training.json").read_text())[-1]["stages"]["decoder"]
    assert stage["steps"] == 3 and set(stage["concepts_after"]) == {"tealstar", "pinksquare", "orangeheart", "browncircle"}
