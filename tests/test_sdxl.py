"""SDXL (tiny SDXL-layout pipeline built offline): the modifier token in both text encoders, k/v of every
cross-attention layer, the added time/text conditioning, the merge on concatenated text features, and the
whole command-line loop."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cdiff_cli.cli import app
from cdiff_cli.errors import CdiffError
from cdiff_cli.merging import concept_prompts, constraint_residual, gram, merge_deltas, prompt_features
from cdiff_cli.models.base import load_pipeline
from cdiff_cli.registry import Registry
from cdiff_cli.training import Concept, TrainConfig, train
from cdiff_cli.training.images import list_images

from .conftest import RES, make_images

runner = CliRunner()


def _train(base, folder, token, cls, steps=4):
    pipe = load_pipeline(str(base))
    cfg = TrainConfig(steps=steps, batch_size=2, lr=1e-3, scale_lr=False, resolution=RES)
    return pipe, train(pipe, [Concept(token, cls, list_images(folder), [])], cfg)


def test_sdxl_training_moves_only_the_new_rows_of_both_encoders_and_kv(sdxl_base, tmp_path):
    pipe = load_pipeline(str(sdxl_base))
    tables = [pipe.text_encoder.get_input_embeddings().weight.detach().clone(),
              pipe.text_encoder_2.get_input_embeddings().weight.detach().clone()]
    unet_before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    pipe2, res = _train(sdxl_base, make_images(tmp_path / "cat"), "<mycat>", "cat")
    d = res.delta
    assert d.embeddings.shape == (1, tables[0].shape[1]) and d.embeddings_2.shape == (1, tables[1].shape[1])
    for te, old in zip((pipe2.text_encoder, pipe2.text_encoder_2), tables):
        new = te.get_input_embeddings().weight
        assert torch.equal(new[: old.shape[0]], old)  # every old row bit-identical
        assert new.shape[0] == old.shape[0] + 1
    changed = {n for n, p in pipe2.unet.named_parameters() if not torch.equal(p, unet_before[n])}
    assert changed == set(d.weights) and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in changed)
    assert len(changed) == 2 * sum(1 for n in unet_before if n.endswith("attn2.to_k.weight"))
    # The second encoder's row was trained too (it feeds both the k/v features and the pooled conditioning).
    init_2 = tables[1][pipe.tokenizer_2("cat", add_special_tokens=False).input_ids].mean(0)
    assert not torch.allclose(d.embeddings_2[0], init_2)


def test_sdxl_merge_satisfies_the_constraints_on_concatenated_features(sdxl_base, tmp_path):
    _, a = _train(sdxl_base, make_images(tmp_path / "cat"), "<mycat>", "cat")
    _, b = _train(sdxl_base, make_images(tmp_path / "chair", colour=(0, 0, 255)), "<mychair>", "chair")
    pipe = load_pipeline(str(sdxl_base))
    G = gram(prompt_features(pipe, ["a photo of a dog", "a red car on a road", "two cats on a sofa", "a chair"] * 20))
    merged, _ = merge_deltas(pipe, [a.delta, b.delta], [["cat"], ["chair"]], G=G)
    assert merged.embeddings_2.shape[0] == 2
    width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    C = [torch.cat(prompt_features(pipe, concept_prompts(t, c))).double() for t, c in (("<mycat>", "cat"), ("<mychair>", "chair"))]
    assert C[0].shape[1] == width  # both encoders' features, concatenated
    for name in merged.weights:
        V = torch.cat([Cn @ d.weights[name].double().T for Cn, d in zip(C, (a.delta, b.delta))])
        assert constraint_residual(merged.weights[name], torch.cat(C), V) < 1e-3


def test_sdxl_command_line_loop(home, sdxl_base, tmp_path):
    args = ["--base", str(sdxl_base), "--steps", "4", "--batch-size", "2", "--resolution", str(RES), "--lr", "5e-3",
            "--device", "cpu", "--num-reg", "2"]
    cat, chair = make_images(tmp_path / "cat"), make_images(tmp_path / "chair", colour=(0, 0, 255), size=(64, 90))
    for name, folder, cls in (("mycat", cat, "cat"), ("mychair", chair, "chair")):
        r = runner.invoke(app, ["train", name, str(folder), "--class", cls, *args])
        assert r.exit_code == 0, r.output
    gen = ["-n", "1", "--steps", "3", "--seed", "1", "--height", str(RES), "--width", str(RES), "--device", "cpu", "--json"]

    def images(prompt, out):
        r = runner.invoke(app, ["gen", prompt, *gen, "-o", str(tmp_path / out), "--base", str(sdxl_base)])
        assert r.exit_code == 0, r.output
        return np.stack([np.asarray(Image.open(p)) for p in json.loads(r.stdout)["images"]]).astype(float)

    plain, with_token = images("photo of a cat", "a"), images("photo of a <mycat> cat", "b")
    assert np.abs(plain - with_token).mean() > 1.0  # the concept changes the image
    assert runner.invoke(app, ["merge", "mycat", "mychair"]).exit_code == 0
    images("<mycat> cat on a <mychair> chair", "c")
    r = runner.invoke(app, ["compress", "mycat", "--json"])
    assert r.exit_code == 0, r.output
    compressed = images("photo of a <mycat> cat", "d")
    assert np.abs(compressed - with_token).mean() < 0.25 * np.abs(plain - with_token).mean()
    # LoRA export carries both encoders' rows (clip_l / clip_g) and imports back.
    r = runner.invoke(app, ["export", "mychair", "--format", "lora", "-o", str(tmp_path / "lora")])
    assert r.exit_code == 0, r.output
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lora" / "embeddings" / "mychair.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"]
    r = runner.invoke(app, ["add", "back", str(tmp_path / "lora"), "--base", str(sdxl_base), "--token", "<back>"])
    assert r.exit_code == 0, r.output
    back, orig = Registry().get("back").load_delta(), Registry().get("mychair").load_delta()
    torch.testing.assert_close(back.embeddings_2, orig.embeddings_2)
    # The diffusers layout (clip_l/clip_g token files) and the reference SDXL script's delta.bin (a list of two
    # rows per token) round-trip both encoders' rows and the k/v weights.
    for i, fmt in enumerate(("diffusers", "reference")):
        r = runner.invoke(app, ["export", "mychair", "--format", fmt, "-o", str(tmp_path / fmt)])
        assert r.exit_code == 0, r.output
        r = runner.invoke(app, ["add", f"back{i}", str(tmp_path / fmt), "--base", str(sdxl_base), "--token", f"<back{i}>"])
        assert r.exit_code == 0, r.output
        back = Registry().get(f"back{i}").load_delta()
        torch.testing.assert_close(back.embeddings, orig.embeddings)
        torch.testing.assert_close(back.embeddings_2, orig.embeddings_2)
        assert back.weights.keys() == orig.weights.keys()
        for n in orig.weights:
            torch.testing.assert_close(back.weights[n], orig.weights[n].float())


def test_sdxl_lora_export_loads_in_diffusers(home, sdxl_base, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from cdiff_cli.core.delta import apply_delta

    args = ["--base", str(sdxl_base), "--steps", "4", "--batch-size", "2", "--resolution", str(RES), "--lr", "5e-3",
            "--device", "cpu", "--reg", "none"]
    assert runner.invoke(app, ["train", "mycat", str(make_images(tmp_path / "cat")), "--class", "cat", *args]).exit_code == 0
    r = runner.invoke(app, ["export", "mycat", "--format", "lora", "-o", str(tmp_path / "lora")])
    assert r.exit_code == 0, r.output
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_base))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10])
    enc = torch.randn(1, 77, 80, generator=g)
    added = {"text_embeds": torch.randn(1, 48, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        base = pipe.unet(x, t, enc, added_cond_kwargs=added).sample
        pipe.load_lora_weights(str(tmp_path / "lora"), weight_name="mycat.safetensors")
        theirs = pipe.unet(x, t, enc, added_cond_kwargs=added).sample
        mine_pipe = load_pipeline(str(sdxl_base))
        apply_delta(mine_pipe, Registry().get("mycat").load_delta())
        mine = mine_pipe.unet(x, t, enc, added_cond_kwargs=added).sample
    assert (theirs - mine).abs().max() < 0.01 * (mine - base).abs().max()
    # The embedding file, loaded the documented diffusers way (one call per text encoder), gives the same
    # prompt features as cdiff's pipeline.
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "lora" / "embeddings" / "mycat.safetensors"))
    pipe.load_textual_inversion(state["clip_l"], token="<mycat>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="<mycat>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    with torch.no_grad():
        theirs_feats = pipe.encode_prompt("photo of a <mycat> cat", device="cpu", do_classifier_free_guidance=False)
        mine_feats = mine_pipe.encode_prompt("photo of a <mycat> cat", device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(theirs_feats[0], mine_feats[0])  # k/v input features
    torch.testing.assert_close(theirs_feats[2], mine_feats[2])  # pooled


def test_sdxl_diffusers_export_loads_in_a_plain_pipeline(home, sdxl_base, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from cdiff_cli.core.delta import apply_delta
    from cdiff_cli.formats import load_diffusers_export_into

    args = ["--base", str(sdxl_base), "--steps", "4", "--batch-size", "2", "--resolution", str(RES), "--lr", "5e-3",
            "--device", "cpu", "--reg", "none"]
    assert runner.invoke(app, ["train", "mycat", str(make_images(tmp_path / "cat")), "--class", "cat", *args]).exit_code == 0
    assert runner.invoke(app, ["export", "mycat", "--format", "diffusers", "-o", str(tmp_path / "d")]).exit_code == 0
    theirs, mine = StableDiffusionXLPipeline.from_pretrained(str(sdxl_base)), load_pipeline(str(sdxl_base))
    assert load_diffusers_export_into(theirs, tmp_path / "d") == ["<mycat>"]
    apply_delta(mine, Registry().get("mycat").load_delta())
    prompt = "photo of a <mycat> cat"
    with torch.no_grad():
        t_feats = theirs.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        m_feats = mine.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(t_feats[0], m_feats[0])
    torch.testing.assert_close(t_feats[2], m_feats[2])
    for (n, p), q in zip(theirs.unet.named_parameters(), mine.unet.parameters()):
        assert torch.equal(p, q), n


def test_single_file_sdxl_checkpoints_load_as_sdxl(tmp_path, monkeypatch):
    """The original-layout key of SDXL's second text encoder picks StableDiffusionXLPipeline.from_single_file."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from cdiff_cli.models import base as base_mod

    xl, sd = tmp_path / "xl.safetensors", tmp_path / "sd.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.ones(2),
               "model.diffusion_model.out.0.weight": torch.ones(2)}, str(xl))
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(2),
               "model.diffusion_model.out.0.weight": torch.ones(2)}, str(sd))
    torch.save({"state_dict": {"conditioner.embedders.1.model.ln_final.weight": torch.ones(2)}}, tmp_path / "xl.ckpt")
    spec = base_mod.resolve_base
    assert base_mod._pipeline_class(spec(str(xl))) is StableDiffusionXLPipeline
    assert base_mod._pipeline_class(spec(str(tmp_path / "xl.ckpt"))) is StableDiffusionXLPipeline
    assert base_mod._pipeline_class(spec(str(sd))) is StableDiffusionPipeline
    called = {}

    def fake(cls, path, **kw):
        called["cls"], called["kw"] = cls, kw
        raise OSError("stop here")

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_single_file", classmethod(fake))
    monkeypatch.setenv("CDIFF_BASE_CONFIG", "/some/sdxl-config")
    with pytest.raises(CdiffError, match="stop here"):
        load_pipeline(str(xl))
    assert called["cls"] is StableDiffusionXLPipeline and called["kw"]["config"] == "/some/sdxl-config"
    assert "safety_checker" not in called["kw"]
