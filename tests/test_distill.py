"""Distillation on ordinary text (`training.distill`): the bank holds the base's own predictions, and a run with
it moves the UNet's predictions on ordinary captions less while the concept still trains."""

import pytest
import torch

from cdiff_cli.core import textcond
from cdiff_cli.core.layers import kv_names
from cdiff_cli.errors import CdiffError
from cdiff_cli.merging.captions import load_captions
from cdiff_cli.testing.tiny import build_tiny_pipeline
from cdiff_cli.training import Concept, TrainConfig, config_dict, train
from cdiff_cli.training.distill import CLASS_SHARE, bank_captions, distill_loss, make_bank, pick_captions
from cdiff_cli.training.images import list_images
from cdiff_cli.training.latents import Latent

from .conftest import RES, make_images


def test_the_bank_takes_every_caption_before_any_twice():
    caps = [f"c{i}" for i in range(5)]
    picks = pick_captions(caps, 12, seed=3)
    assert sorted(picks[:5]) == caps and sorted(picks[5:10]) == caps and len(picks) == 12
    assert picks == pick_captions(caps, 12, seed=3) and picks != pick_captions(caps, 12, seed=4)


def test_one_bank_entry_in_four_holds_a_class_prompt_each_class_in_turn():
    caps = [f"c{i}" for i in range(50)]
    picks = bank_captions(caps, ["cat", "dog", "cat"], 40, seed=0)
    assert len(picks) == 40 and CLASS_SHARE == 4
    assert picks[30:] == ["photo of a cat", "photo of a dog"] * 5
    assert picks[:30] == pick_captions(caps, 30, 0)
    assert bank_captions(caps, [], 40, seed=0) == pick_captions(caps, 40, 0)


def _latents(pipe, n=3):
    g = torch.Generator().manual_seed(0)
    size = RES // pipe.vae_scale_factor
    return [Latent(torch.randn(4, size, size, generator=g), 0.1 * torch.ones(4, size, size)) for _ in range(n)]


def test_the_bank_holds_the_base_prediction_and_is_made_the_same_each_time():
    from diffusers import DDPMScheduler

    pipe = build_tiny_pipeline("sd1")
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    caps = list(load_captions())[:7]
    bank = make_bank(pipe, pipe.unet, sched, _latents(pipe), pick_captions(caps, 20, 1), seed=1, device="cpu")
    assert len(bank) == 20 and bank.pooled is None
    with torch.no_grad():
        pred = pipe.unet(bank.noisy[:4], bank.t[:4], bank.text[:4]).sample
        hidden, _, _ = textcond.encode(pipe, pick_captions(caps, 4, 1), "cpu")
    assert float(distill_loss(pred, bank.target[:4])) < 1e-10  # at the base, nothing to pay
    assert torch.allclose(bank.text[:4], hidden)  # each entry under its own caption
    again = make_bank(pipe, pipe.unet, sched, _latents(pipe), pick_captions(caps, 20, 1), seed=1, device="cpu")
    assert torch.equal(again.noisy, bank.noisy) and torch.equal(again.target, bank.target)


def _ordinary_prediction_change(pipe, base_unet_out: torch.Tensor, probe) -> float:
    with torch.no_grad():
        out = pipe.unet(*probe).sample
    return float((out - base_unet_out).pow(2).mean())


def test_a_run_with_distillation_moves_ordinary_predictions_less(tmp_path):
    imgs = list_images(make_images(tmp_path / "a"))
    changes, rows = [], []
    for weight in (0.0, 30.0):
        pipe = build_tiny_pipeline("sd1")
        size = RES // pipe.vae_scale_factor
        with torch.no_grad():
            hidden, _, _ = textcond.encode(pipe, list(load_captions())[100:104], "cpu")
        probe = (torch.randn(4, 4, size, size, generator=torch.Generator().manual_seed(5)),
                 torch.tensor([100, 300, 500, 700]), hidden)
        with torch.no_grad():
            before = pipe.unet(*probe).sample
        kv_before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if n in kv_names([n])}
        cfg = TrainConfig(steps=30, batch_size=2, lr=2e-3, resolution=RES, aug=False, distill=weight)
        res = train(pipe, [Concept("<a1>", "cat", imgs)], cfg)
        changes.append(_ordinary_prediction_change(pipe, before, probe))
        rows.append(res.delta.embeddings[0])
        assert all(not torch.equal(res.delta.weights[n], kv_before[n]) for n in kv_before)  # k/v still train
    assert changes[1] < 0.5 * changes[0], changes
    assert not torch.equal(rows[0], rows[1])


def test_distillation_is_recorded_only_when_on_and_a_negative_weight_is_refused():
    assert "distill" not in config_dict(TrainConfig())
    assert config_dict(TrainConfig(distill=0.5))["distill"] == 0.5
    with pytest.raises(CdiffError, match="distill"):
        TrainConfig(distill=-1.0).check()


def test_a_stopped_run_with_distillation_resumes_bit_identical(tmp_path, sd1_base, cat_images):
    """The bank is made again by the resumed run from the base's weights and its own generator: the same bank."""
    from cdiff_cli.errors import TrainingStopped
    from cdiff_cli.registry import Registry
    from cdiff_cli.stopping import StopSignals
    from cdiff_cli.training.entry import ConceptSpec, RegOptions, train_entry

    from .dist_worker import SignalAt
    from .test_resume import _assert_same_delta

    def run(reg, **kw):
        cfg = TrainConfig(steps=6, batch_size=4, lr=1e-3, resolution=RES, aug_pool=3, precision="fp32", distill=1.0)
        with StopSignals() as stop:
            return train_entry(reg, "mycat", [ConceptSpec("<mycat>", "cat", cat_images)], cfg, base=str(sd1_base),
                               reg=RegOptions("none", None, 0), device="cpu", checkpoint_every=0, stop=stop, **kw)[0]

    whole = run(Registry(tmp_path / "a"))
    reg = Registry(tmp_path / "b")
    with pytest.raises(TrainingStopped):
        run(reg, progress=SignalAt(3))
    _assert_same_delta(whole.load_delta(), run(reg, resume=True).load_delta())
    assert whole.manifest["train"]["distill"] == 1.0


def test_cdiff_train_takes_distill_and_refuses_a_negative_weight(home, sd1_base, cat_images):
    from cdiff_cli.registry import Registry

    from .test_cli import TRAIN, cdiff

    cdiff("train", "kept", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN, "--reg", "none", "--distill", "2")
    assert Registry(home).get("kept").manifest["train"]["distill"] == 2.0
    r = cdiff("train", "bad", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN, "--distill", "-1", ok=False)
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_sdxl_distils_with_its_pooled_text(tmp_path):
    """SDXL's UNet also reads the pooled text of the second encoder: the bank keeps it per entry."""
    from cdiff_cli.testing.tiny import build_tiny_sdxl_pipeline

    imgs = list_images(make_images(tmp_path / "a"))
    pipe = build_tiny_sdxl_pipeline()
    res = train(pipe, [Concept("<a1>", "cat", imgs)], TrainConfig(steps=3, batch_size=2, lr=1e-3, resolution=RES,
                                                                   distill=1.0))
    assert all(map(torch.isfinite, map(torch.tensor, res.losses)))
    assert any(not torch.equal(w, p) for n, p in build_tiny_sdxl_pipeline().unet.named_parameters()
               for m, w in res.delta.weights.items() if m == n)
