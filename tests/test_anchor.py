"""The anchor on ordinary text (`training.anchor`): its penalty is the merge's drift measure, and a run with it
moves the k/v outputs of ordinary captions less while the concept still trains."""

import pytest
import torch

from cdiff_cli.core.layers import kv_names
from cdiff_cli.errors import CdiffError
from cdiff_cli.merging.captions import load_captions
from cdiff_cli.merging.closed_form import prompt_features
from cdiff_cli.testing.tiny import build_tiny_pipeline
from cdiff_cli.training import Concept, TrainConfig, train
from cdiff_cli.training.anchor import Anchor, anchor_gram, anchor_penalty
from cdiff_cli.training.images import list_images

from .conftest import RES, make_images


def test_penalty_is_the_squared_change_of_outputs_on_the_anchored_rows():
    g = torch.Generator().manual_seed(0)
    C, D = torch.randn(7, 5, generator=g), torch.randn(3, 5, generator=g)
    expected = float((D @ C.T).pow(2).sum())
    assert float(anchor_penalty([D], C.T @ C, 1.0)) == pytest.approx(expected, rel=1e-5)
    assert float(anchor_penalty([D, D], C.T @ C, 0.5)) == pytest.approx(expected, rel=1e-5)


def test_penalty_is_relative_to_the_base_outputs():
    g = torch.Generator().manual_seed(1)
    W0 = {"down.attn2.to_k.weight": torch.nn.Parameter(torch.randn(4, 6, generator=g)),
          "down.attn2.to_v.weight": torch.nn.Parameter(torch.randn(4, 6, generator=g))}
    C = torch.randn(9, 6, generator=g)
    anchor = Anchor(W0, C.T @ C)
    moved = {n: torch.nn.Parameter(1.1 * p.detach()) for n, p in W0.items()}  # every output 10 % larger
    assert float(anchor.penalty(moved).detach()) == pytest.approx(0.01, rel=1e-4)
    assert float(anchor.penalty(W0).detach()) == 0.0


def test_the_class_prompt_is_pinned_into_the_gram():
    pipe = build_tiny_pipeline("sd1")
    captions = list(load_captions())[:20]
    plain = anchor_gram(pipe, captions, [])
    pinned = anchor_gram(pipe, captions, ["cat", "cat"])
    P = pinned - plain
    rows = torch.cat(prompt_features(pipe, ["photo of a cat"])).double()
    # the class prompt's rows, weighted as all the captions together (pinned once, though named twice)
    assert torch.allclose(P, (torch.trace(plain) / (rows * rows).sum()) * rows.T @ rows, rtol=1e-6, atol=1e-6)


def _ordinary_output_change(pipe, before: dict) -> float:
    C = torch.cat(prompt_features(pipe, list(load_captions())[:50]))
    params = dict(pipe.unet.named_parameters())
    return sum(float(((params[n].detach() - before[n]) @ C.T).pow(2).sum()) for n in before)


def test_a_run_with_the_anchor_moves_ordinary_captions_less(tmp_path):
    imgs = list_images(make_images(tmp_path / "a"))
    changes, rows = [], []
    for anchor in (0.0, 100.0):
        pipe = build_tiny_pipeline("sd1")
        before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if n in kv_names([n])}
        cfg = TrainConfig(steps=30, batch_size=2, lr=2e-3, resolution=RES, aug=False, anchor=anchor)
        res = train(pipe, [Concept("<a1>", "cat", imgs)], cfg)
        changes.append(_ordinary_output_change(pipe, before))
        rows.append(res.delta.embeddings[0])
        assert all(not torch.equal(res.delta.weights[n], before[n]) for n in before)  # the k/v weights still train
    assert changes[1] < 0.3 * changes[0], changes
    assert not torch.equal(rows[0], rows[1])


def test_a_negative_anchor_is_refused():
    with pytest.raises(CdiffError, match="anchor"):
        TrainConfig(anchor=-1.0).check()


def test_cdiff_train_records_the_anchor_and_caches_its_gram(home, sd1_base, cat_images):
    from cdiff_cli.registry import Registry

    from .test_cli import TRAIN, cdiff

    cdiff("train", "plain", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN, "--reg", "none")
    assert "anchor" not in Registry(home).get("plain").manifest["train"]  # off by default, recorded as before
    assert not list((home / "cache" / "gram").glob("*.safetensors"))
    cdiff("train", "anchored", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN, "--reg", "none", "--anchor", "2")
    assert Registry(home).get("anchored").manifest["train"]["anchor"] == 2.0
    assert len(list((home / "cache" / "gram").glob("*.safetensors"))) == 1  # shared with cdiff merge's regulariser
    r = cdiff("train", "bad", cat_images, "--class", "cat", "--base", sd1_base, *TRAIN, "--anchor", "-1", ok=False)
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_sdxl_anchors_both_text_encoders_features(tmp_path):
    """SDXL's k/v layers read both encoders' states side by side: G must be as wide as they are."""
    from cdiff_cli.testing.tiny import build_tiny_sdxl_pipeline

    imgs = list_images(make_images(tmp_path / "a"))
    pipe = build_tiny_sdxl_pipeline()
    G = anchor_gram(pipe, list(load_captions())[:20], ["cat"])
    width = next(p for n, p in pipe.unet.named_parameters() if n.endswith("attn2.to_k.weight")).shape[1]
    assert G.shape == (width, width)
    res = train(pipe, [Concept("<a1>", "cat", imgs)], TrainConfig(steps=2, batch_size=2, lr=1e-3, resolution=RES,
                                                                   anchor=1.0), anchor_gram=G)
    assert all(map(torch.isfinite, map(torch.tensor, res.losses)))


def test_on_nano_the_default_gram_is_over_the_worlds_captions(tmp_path):
    """A bare `train` computes G itself from the captions of the base it was loaded from: on nano the world's (the
    shipped English sentences fall apart into letters in its vocabulary)."""
    from cdiff_cli import world
    from cdiff_cli.models.base import load_pipeline
    from cdiff_cli.world.scores import regulariser_captions

    world.save_concept_images("browncircle", tmp_path / "bc", n=2, seed=0)
    imgs = list_images(tmp_path / "bc")
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-3, scale_lr=False, resolution=64, aug=False, anchor=100.0)
    pipe = load_pipeline("nano")
    G = anchor_gram(pipe, list(regulariser_captions()), ["circle"])
    explicit = train(pipe, [Concept("<bc>", "circle", imgs)], cfg, anchor_gram=G).delta
    default = train(load_pipeline("nano"), [Concept("<bc>", "circle", imgs)], cfg).delta
    english = train(load_pipeline("nano"), [Concept("<bc>", "circle", imgs)], cfg,
                    anchor_gram=anchor_gram(load_pipeline("nano"), list(load_captions()), ["circle"])).delta
    assert all(torch.equal(default.weights[n], explicit.weights[n]) for n in explicit.weights)
    assert not all(torch.equal(english.weights[n], explicit.weights[n]) for n in explicit.weights)
