"""Training changes exactly what Custom Diffusion trains, and every concept token learns."""

import pytest
import torch

from cdiff_cli.core import textcond
from cdiff_cli.core.layers import trainable_names
from cdiff_cli.testing.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline
from cdiff_cli.training import Concept, TrainConfig, balanced_slots, split_batch, train
from cdiff_cli.training.images import ImageItem, list_images

from .conftest import RES, make_images


def _snapshot(pipe):
    return (
        {n: p.detach().clone() for n, p in pipe.unet.named_parameters()},
        {n: p.detach().clone() for n, p in pipe.text_encoder.named_parameters()},
    )


def _run(pipe, concepts, **kw):
    cfg = TrainConfig(steps=kw.pop("steps", 6), batch_size=kw.pop("batch_size", 4), lr=1e-3, resolution=RES, **kw)
    return train(pipe, concepts, cfg)


def test_kv_mode_changes_only_cross_attention_kv_and_new_token_rows(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    unet0, te0 = _snapshot(pipe)
    vocab0 = len(pipe.tokenizer)
    imgs = list_images(make_images(tmp_path / "a"))
    res = _run(pipe, [Concept("<a1>", "cat", imgs, reg=imgs)])
    changed = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, unet0[n])}
    assert changed == set(trainable_names(pipe.unet, "kv"))
    assert all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in changed)
    # Text encoder: everything identical except the embedding table, which only grew by the new row.
    for n, p in pipe.text_encoder.named_parameters():
        if n.endswith("token_embedding.weight"):
            assert p.shape[0] == vocab0 + 1
            assert torch.equal(p[:vocab0], te0[n])  # bit-identical old rows
            assert not torch.equal(p[vocab0], te0[n][pipe.tokenizer("cat", add_special_tokens=False).input_ids[0]])
        else:
            assert torch.equal(p, te0[n]), n
    assert set(res.delta.weights) == changed
    assert res.delta.tokens == ["<a1>"] and res.delta.embeddings.shape == (1, 32)
    assert torch.equal(res.delta.embeddings[0], pipe.text_encoder.get_input_embeddings().weight[vocab0])


def test_crossattn_mode_changes_q_and_out_too(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    unet0, _ = _snapshot(pipe)
    imgs = list_images(make_images(tmp_path / "a"))
    _run(pipe, [Concept("<a1>", "cat", imgs)], mode="crossattn", aug=False)
    changed = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, unet0[n])}
    assert changed == set(trainable_names(pipe.unet, "crossattn"))
    assert any("attn2.to_q" in n for n in changed) and any("attn2.to_out.0.bias" in n for n in changed)
    assert not any("attn1" in n for n in changed)


def test_joint_training_trains_every_token(tmp_path):
    # The reference trainer never trains the last modifier token; here each must move.
    pipe = build_tiny_pipeline("sd1")
    init = {w: pipe.text_encoder.get_input_embeddings().weight[
        pipe.tokenizer(w, add_special_tokens=False).input_ids].mean(0).detach().clone() for w in ("cat", "chair", "dog")}
    c = [
        Concept("<a1>", "cat", list_images(make_images(tmp_path / "a"))),
        Concept("<b1>", "chair", list_images(make_images(tmp_path / "b", colour=(0, 255, 0)))),
        Concept("<c1>", "dog", list_images(make_images(tmp_path / "c", colour=(0, 0, 255)))),
    ]
    res = _run(pipe, c, steps=6, batch_size=3)
    for k, w in enumerate(("cat", "chair", "dog")):
        assert not torch.allclose(res.delta.embeddings[k], init[w]), f"token {k} did not train"


def test_sd2_v_prediction_trains(tmp_path):
    pipe = build_tiny_pipeline("sd2")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    unet0, _ = _snapshot(pipe)
    imgs = list_images(make_images(tmp_path / "a"))
    res = _run(pipe, [Concept("<a1>", "cat", imgs, reg=imgs)])
    assert res.delta.embeddings.shape == (1, 48)
    changed = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, unet0[n])}
    assert changed == set(trainable_names(pipe.unet, "kv"))


def test_batches_are_balanced_and_half_regularisation():
    assert split_batch(8, True) == (4, 4)
    assert split_batch(1, True) == (1, 1)
    assert split_batch(8, False) == (8, 0)
    counts = [0, 0, 0]
    for step in range(30):
        for ci in balanced_slots(step, 4, 3):
            counts[ci] += 1
    assert counts == [40, 40, 40]


def test_training_lowers_loss_on_a_fixed_image(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    imgs = list_images(make_images(tmp_path / "a", n=1))
    res = _run(pipe, [Concept("<a1>", "cat", imgs)], steps=40, batch_size=2, aug=False, hflip=False)
    first, last = sum(res.losses[:8]) / 8, sum(res.losses[-8:]) / 8
    assert last < first


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_freeing_what_the_steps_do_not_read_changes_nothing_but_memory(tmp_path, arch):
    """`cdiff train` (keep_pipe=False) frees the VAE on a CPU once the latents are cached, and cuts each
    token-embedding table down to the rows the run's prompts use: the same delta comes out."""
    imgs = list_images(make_images(tmp_path / "a"))
    captions = [ImageItem(i.path, f"a {w} cat on a rug") for i, w in zip(imgs, ["grey", "small", "sleepy"])]
    results = []
    for keep in (True, False):
        pipe = build_tiny_sdxl_pipeline() if arch == "sdxl" else build_tiny_pipeline("sd1")
        cfg = TrainConfig(steps=3, batch_size=4, lr=1e-3, resolution=RES, aug_pool=2)
        concept = Concept("<a1>", "cat", imgs, reg=captions)
        results.append(train(pipe, [concept], cfg, keep_pipe=keep).delta)
        assert all(p.is_meta for p in pipe.vae.parameters()) is (not keep)
        for tok, te in textcond.encoders(pipe):
            rows, n = te.get_input_embeddings().weight.shape[0], len(tok)
            if keep:
                assert rows == n
            else:  # exactly the ids of the concept's prompts (every augmentation prefix) and its captions
                used = {i for p in concept.prompts() + [""] for i in textcond.tokenize(tok, [p])[0].tolist()}
                assert rows == len(used) < n // 2
    kept, freed = results
    assert torch.equal(kept.embeddings, freed.embeddings)
    if arch == "sdxl":
        assert torch.equal(kept.embeddings_2, freed.embeddings_2)
    assert all(torch.equal(kept.weights[n], freed.weights[n]) for n in kept.weights)


def test_a_cut_down_table_returns_the_full_tables_rows_and_refuses_other_ids():
    table = torch.randn(50, 4)
    used = textcond.UsedRows(table, torch.tensor([7, 3, 7, 42, 0]))
    assert used.weight.shape == (4, 4)
    ids = torch.tensor([[0, 3, 42, 7, 7]])
    assert torch.equal(used(ids), table[ids])
    with pytest.raises(RuntimeError, match="lacks"):
        used(torch.tensor([[0, 5]]))
