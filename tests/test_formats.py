"""Import/export of deltas in the diffusers, reference (adobe-research) and CompVis layouts."""

import json
import pathlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cdiff_cli import formats as F
from cdiff_cli.core.delta import Delta, apply_delta
from cdiff_cli.core.layers import read_weights, trainable_names
from cdiff_cli.errors import CdiffError
from cdiff_cli.testing.tiny import build_tiny_pipeline

TOKENS = ["<new1>", "<new2>"]


@pytest.fixture(scope="module")
def sd1():
    return build_tiny_pipeline("sd1")


@pytest.fixture(scope="module")
def sd2():
    return build_tiny_pipeline("sd2")


def make_delta(pipe, mode="kv", tokens=TOKENS, seed=1):
    """A delta whose weights differ from the base's (base + noise)."""
    g = torch.Generator().manual_seed(seed)
    base = read_weights(pipe.unet, trainable_names(pipe.unet, mode))
    weights = {n: v + 0.1 * torch.randn(v.shape, generator=g) for n, v in base.items()}
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    return Delta(weights, list(tokens), torch.randn(len(tokens), dim, generator=g), mode)


def assert_same(a: Delta, b: Delta, tokens=None):
    assert b.tokens == (tokens or a.tokens)
    assert b.mode == a.mode
    assert sorted(a.weights) == sorted(b.weights)
    for name in a.weights:
        assert torch.equal(a.weights[name], b.weights[name]), name
    assert torch.equal(a.embeddings, b.embeddings)


def cross_attention_params(unet):
    return [n for n, _ in unet.named_parameters() if ".attn2." in n]


# ---------------------------------------------------------------- LDM <-> diffusers names


def test_ldm_mapping_round_trips_on_every_cross_attention_layer(sd1, sd2):
    for pipe in (sd1, sd2):
        assert pipe.unet.config.layers_per_block == 2
        names = cross_attention_params(pipe.unet)
        assert len(names) > 20
        for name in names:
            ldm = F.diffusers_to_ldm(name)
            assert ldm.startswith("model.diffusion_model.")
            assert ldm.endswith(name[name.index("transformer_blocks") :])
            assert F.ldm_to_diffusers(ldm) == name
            assert F.ldm_to_diffusers(ldm[len(F.LDM_PREFIX) :]) == name  # prefix optional
        assert len({F.diffusers_to_ldm(n) for n in names}) == len(names)


def test_ldm_mapping_matches_stable_diffusion_layout():
    # SD 1.x/2.x: attention at input_blocks 1,2,4,5,7,8, middle_block, output_blocks 3..11.
    attn = ".transformer_blocks.0.attn2.to_k.weight"
    tail = ".1" + attn  # the transformer is sub-module 1 of an LDM block
    expected = {
        "input_blocks.1": "down_blocks.0.attentions.0",
        "input_blocks.2": "down_blocks.0.attentions.1",
        "input_blocks.4": "down_blocks.1.attentions.0",
        "input_blocks.8": "down_blocks.2.attentions.1",
        "output_blocks.3": "up_blocks.1.attentions.0",
        "output_blocks.5": "up_blocks.1.attentions.2",
        "output_blocks.6": "up_blocks.2.attentions.0",
        "output_blocks.11": "up_blocks.3.attentions.2",
    }
    for ldm, dif in expected.items():
        dif_name = dif + attn
        assert F.ldm_to_diffusers(F.LDM_PREFIX + ldm + tail) == dif_name
        assert F.diffusers_to_ldm(dif_name) == F.LDM_PREFIX + ldm + tail
    mid = "middle_block.1.transformer_blocks.0.attn2.to_out.0.bias"
    assert F.ldm_to_diffusers(mid) == "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.bias"
    # layers_per_block is honoured in both directions
    assert F.ldm_to_diffusers("input_blocks.3" + tail, layers_per_block=1) == "down_blocks.1.attentions.0" + attn
    assert F.diffusers_to_ldm("up_blocks.1.attentions.1" + attn, layers_per_block=1) == F.LDM_PREFIX + "output_blocks.3" + tail
    bad_names = ("input_blocks.3" + tail, "input_blocks.0" + tail, "input_blocks.1.0.in_layers.2.weight", "cond_stage_model.x")
    for bad in bad_names:
        with pytest.raises(CdiffError):
            F.ldm_to_diffusers(bad)
    with pytest.raises(CdiffError):
        F.diffusers_to_ldm("down_blocks.0.attentions.2.transformer_blocks.0.attn2.to_k.weight")


# ---------------------------------------------------------------- diffusers layout


@pytest.mark.parametrize("mode", ["kv", "crossattn"])
def test_diffusers_export_round_trip(sd1, tmp_path, mode):
    delta = make_delta(sd1, mode)
    files = F.export_diffusers(delta, tmp_path / "out")
    names = sorted(p.name for p in files)
    assert names == sorted([F.WEIGHTS_SAFE, "<new1>.safetensors", "<new2>.safetensors", F.EXPORT_MANIFEST])

    state = load_file(str(tmp_path / "out" / F.WEIGHTS_SAFE))
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_custom_diffusion.weight"
    assert torch.equal(state[k], delta.weights["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"])
    if mode == "crossattn":
        assert "mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_custom_diffusion.0.bias" in state
    # diffusers' own loader accepts every processor state dict (strict load_state_dict)
    procs = sd1.unet._process_custom_diffusion(state)
    assert len(procs) == len(delta.weights) // (2 if mode == "kv" else 5)
    assert all(p.train_q_out == (mode == "crossattn") for p in procs.values())

    with safe_open(str(tmp_path / "out" / "<new2>.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["<new2>"] and f.get_tensor("<new2>").shape == (delta.token_dim,)
    manifest = json.loads((tmp_path / "out" / F.EXPORT_MANIFEST).read_text())
    assert manifest["mode"] == mode and [t["token"] for t in manifest["tokens"]] == TOKENS

    assert F.detect_format(tmp_path / "out") == "diffusers"
    assert_same(delta, F.load_delta_file(tmp_path / "out", base_unet=sd1.unet))
    # the weights file itself works too, finding the token files beside it
    assert_same(delta, F.load_delta_file(tmp_path / "out" / F.WEIGHTS_SAFE))


def _install_custom_diffusion_processors(unet, delta):
    """Set processors the way diffusers' train_custom_diffusion.py does, holding the delta's weights."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    procs = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.rsplit(".processor", 1)[0])
        if name.endswith("attn1.processor"):
            procs[name] = CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False)
            continue
        procs[name] = CustomDiffusionAttnProcessor(
            train_kv=True,
            train_q_out=delta.mode == "crossattn",
            hidden_size=attn.to_k.weight.shape[0],
            cross_attention_dim=attn.to_k.weight.shape[1],
        )
    unet.set_attn_processor(procs)
    state = {F.to_processor_key(n): v for n, v in delta.weights.items()}
    missing = [k for k in unet.state_dict() if "custom_diffusion" in k and k not in state]
    assert not missing
    unet.load_state_dict(state, strict=False)


@pytest.mark.parametrize("safe", [False, True])
def test_folder_saved_by_diffusers_itself(tmp_path, safe):
    """A real `save_attn_procs` folder: the .bin has empty-dict attn1 entries; tokens are `<newN>.bin`."""
    pipe = build_tiny_pipeline("sd1")
    delta = make_delta(pipe, "crossattn" if safe else "kv")
    _install_custom_diffusion_processors(pipe.unet, delta)
    pipe.unet.save_attn_procs(str(tmp_path), safe_serialization=safe)
    weights_file = tmp_path / (F.WEIGHTS_SAFE if safe else F.WEIGHTS_BIN)
    assert weights_file.is_file()
    if not safe:
        raw = torch.load(weights_file, weights_only=True)
        assert any(k.endswith("attn1.processor") and v == {} for k, v in raw.items())
        # our export writes exactly diffusers' tensor keys
        exported = F.export_diffusers(delta, tmp_path / "ours")[0]
        assert set(load_file(str(exported))) == {k for k, v in raw.items() if isinstance(v, torch.Tensor)}
    # save_new_embed: `<token>.bin`, safetensors content when safe_serialization, else torch.save
    for token, emb in zip(delta.tokens, delta.embeddings):
        if safe:
            save_file({token: emb.clone()}, str(tmp_path / f"{token}.bin"))
        else:
            torch.save({token: emb.clone()}, tmp_path / f"{token}.bin")
    assert F.detect_format(tmp_path) == "diffusers"
    assert_same(delta, F.load_delta_file(tmp_path, base_unet=pipe.unet))


def test_natural_token_order_without_manifest(sd1, tmp_path):
    tokens = [f"<new{i}>" for i in (1, 2, 10)]
    delta = make_delta(sd1, tokens=tokens)
    F.export_diffusers(delta, tmp_path)
    (tmp_path / F.EXPORT_MANIFEST).unlink()  # as train_custom_diffusion.py leaves it
    assert_same(delta, F.load_delta_file(tmp_path))


def test_diffusers_export_changes_a_plain_pipeline_exactly_like_the_delta(tmp_path):
    delta = make_delta(build_tiny_pipeline("sd1"))
    F.export_diffusers(delta, tmp_path)

    torch.manual_seed(5)
    latents, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    states = torch.randn(1, 77, 32)

    def run(pipe, prompt=None):
        ehs = states
        if prompt is not None:
            ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
            ehs = pipe.text_encoder(ids)[0]
        with torch.no_grad():
            return pipe.unet(latents, t, encoder_hidden_states=ehs).sample

    plain = build_tiny_pipeline("sd1")
    before = run(plain)
    assert F.load_diffusers_export_into(plain, tmp_path) == TOKENS
    after = run(plain)
    assert not torch.allclose(before, after)

    direct = build_tiny_pipeline("sd1")
    apply_delta(direct, delta)
    assert torch.equal(after, run(direct))
    prompt = "a photo of <new1> cat on <new2> sofa"
    assert plain.tokenizer(prompt).input_ids == direct.tokenizer(prompt).input_ids
    assert torch.equal(run(plain, prompt), run(direct, prompt))


def test_export_refuses_tokens_that_are_not_file_names(sd1, tmp_path):
    for bad in (["a/b", "<x>"], ["..", "<x>"], ["<X1>", "<x1>"]):
        with pytest.raises(CdiffError):
            F.export_diffusers(make_delta(sd1, tokens=bad), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- reference layouts


@pytest.mark.parametrize("mode", ["kv", "crossattn"])
def test_reference_delta_bin_round_trip(sd1, tmp_path, mode):
    delta = make_delta(sd1, mode)
    (path,) = F.export_reference(delta, tmp_path)
    assert path.name == "delta.bin"
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"unet", "modifier_token"} and list(raw["modifier_token"]) == TOKENS
    assert F.detect_format(path) == F.detect_format(tmp_path) == "reference"
    assert_same(delta, F.load_delta_file(path, base_unet=sd1.unet))


def test_reference_ckpt_round_trip(sd1, tmp_path):
    delta = make_delta(sd1)
    state = {F.diffusers_to_ldm(n): v.clone() for n, v in delta.weights.items()}
    state["embed"] = delta.embeddings.clone()
    path = tmp_path / "delta_epoch=1.ckpt"
    torch.save({"state_dict": state}, path)
    assert F.detect_format(path) == F.detect_format(tmp_path) == "reference-ckpt"
    assert_same(delta, F.load_delta_file(path, base_unet=sd1.unet))  # tokens are named <new1>, <new2>
    renamed = F.load_delta_file(tmp_path, token_rename=["<cat>", "<sofa>"])
    assert_same(delta, renamed, tokens=["<cat>", "<sofa>"])


def test_cdiff_files_and_folders(sd1, tmp_path):
    delta = make_delta(sd1, "crossattn")
    delta.save(tmp_path / "delta.safetensors")
    for path in (tmp_path, tmp_path / "delta.safetensors"):
        assert F.detect_format(path) == "cdiff"
        assert_same(delta, F.load_delta_file(path))


def test_token_renaming(sd1, tmp_path):
    delta = make_delta(sd1)
    F.export_reference(delta, tmp_path)
    assert F.load_delta_file(tmp_path, token_rename={"<new2>": "<sofa>"}).tokens == ["<new1>", "<sofa>"]
    assert F.load_delta_file(tmp_path, token_rename=["<a1>", "<b1>"]).tokens == ["<a1>", "<b1>"]
    for bad in ({"<nope>": "<x>"}, ["<only-one>"], ["<same>", "<SAME>"]):
        with pytest.raises(CdiffError) as err:
            F.load_delta_file(tmp_path, token_rename=bad)
        assert str(tmp_path) in str(err.value)


# ---------------------------------------------------------------- refusals


def test_shape_mismatch_refused(sd1, sd2, tmp_path):
    delta2 = make_delta(sd2)
    with pytest.raises(CdiffError, match=r"attn2\.to_k\.weight.*shape"):
        F.check_against_base(delta2, sd1.unet)
    F.export_diffusers(delta2, tmp_path)
    with pytest.raises(CdiffError, match="shape"):
        F.load_delta_file(tmp_path, base_unet=sd1.unet)
    # same UNet layers but an embedding of the wrong width
    delta1 = make_delta(sd1)
    F.check_against_base(delta1, sd1.unet, sd1.text_encoder)
    wide = Delta(delta1.weights, delta1.tokens, torch.zeros(2, 48))
    with pytest.raises(CdiffError, match="48"):
        F.check_against_base(wide, sd1.unet, sd1.text_encoder)
    unknown = {**delta1.weights, "down_blocks.9.attn2.to_k.weight": torch.zeros(1)}
    extra = Delta(unknown, delta1.tokens, delta1.embeddings)
    with pytest.raises(CdiffError, match="down_blocks.9"):
        F.check_against_base(extra, sd1.unet)


class _Payload:
    """A pickled object whose unpickling would create a file: weights_only must never run it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickles_with_objects_are_refused(sd1, tmp_path):
    marker = tmp_path / "pwned"
    delta = make_delta(sd1)
    torch.save({"unet": dict(delta.weights), "modifier_token": {"<a1>": _Payload(marker)}}, tmp_path / "delta.bin")
    with pytest.raises(CdiffError, match="not a plain tensor file"):
        F.load_delta_file(tmp_path / "delta.bin")
    assert not marker.exists()

    folder = tmp_path / "diffusers"
    F.export_diffusers(delta, folder)
    (folder / F.EXPORT_MANIFEST).unlink()
    (folder / "<new2>.safetensors").unlink()
    torch.save({"<new2>": _Payload(marker)}, folder / "<new2>.bin")
    with pytest.raises(CdiffError, match=r"<new2>\.bin is not a plain tensor file"):
        F.load_delta_file(folder)
    assert not marker.exists()


def test_unknown_and_broken_inputs_refused(sd1, tmp_path):
    delta = make_delta(sd1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    cases = {}

    def case(name, obj, match):
        path = tmp_path / name
        torch.save(obj, path)
        cases[path] = match

    kv = {n: v for n, v in delta.weights.items()}
    case("te.bin", {"unet": kv, "modifier_token": {"<a1>": delta.embeddings[0]}, "text_encoder": {}}, "text encoder")
    compressed = {n: {"u": torch.zeros(2, 1), "v": torch.zeros(1, 2)} for n in kv}
    one_token = {"<a1>": delta.embeddings[0]}
    case("compressed.bin", {"unet": compressed, "modifier_token": one_token}, "compressed reference deltas are not supported")
    case("notoken.bin", {"unet": kv, "modifier_token": {}}, "no token embedding")
    q_only = {n.replace("to_k", "to_q").replace("to_v", "to_q"): v for n, v in kv.items()}
    case("nokv.bin", {"unet": q_only, "modifier_token": {"<a1>": delta.embeddings[0]}}, "no cross-attention k/v")
    case("noembed.ckpt", {"state_dict": {F.diffusers_to_ldm(n): v for n, v in kv.items()}}, "no token embedding")
    case("other.bin", {"weight": torch.zeros(2), "bias": torch.zeros(2)}, "unknown layout")
    case("list.bin", [torch.zeros(1)], "not a dict")
    (tmp_path / "garbage.bin").write_bytes(b"not a pickle at all")
    cases[tmp_path / "garbage.bin"] = "not a plain tensor file"
    cases[tmp_path / "empty"] = "unknown folder layout"
    cases[tmp_path / "missing"] = "no such file or folder"

    for path, match in cases.items():
        with pytest.raises(CdiffError, match=match) as err:
            F.load_delta_file(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        if path.name in ("other.bin", "garbage.bin", "empty", "missing"):
            with pytest.raises(CdiffError):
                F.detect_format(path)

    # a diffusers folder without token files
    folder = tmp_path / "weights-only"
    F.export_diffusers(delta, folder)
    for p in folder.iterdir():
        if p.name != F.WEIGHTS_SAFE:
            p.unlink()
    with pytest.raises(CdiffError, match="no token embedding"):
        F.load_delta_file(folder)
