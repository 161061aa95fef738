"""--offload: the frozen UNet weights leave the device between layer runs; training is unchanged."""

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from cdiff_cli.core.layers import trainable_names
from cdiff_cli.models import offload
from cdiff_cli.testing.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline
from cdiff_cli.training import Concept, TrainConfig, train
from cdiff_cli.training.images import list_images

from .conftest import RES, make_images


def _train(pipe, imgs, **kw):
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-3, resolution=RES, **kw)
    return train(pipe, [Concept("<a1>", "cat", imgs, reg=imgs)], cfg)


def _checkpointing(module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in module.modules())


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_offloaded_training_gives_the_same_weights_as_checkpointed_training(tmp_path, monkeypatch, kind):
    build = build_tiny_sdxl_pipeline if kind == "sdxl" else (lambda: build_tiny_pipeline("sd1"))
    imgs = list_images(make_images(tmp_path / "a"))
    ref, off = build(), build()
    a = _train(ref, imgs, gradient_checkpointing=True)

    real, seen = offload.frozen_weights_offloaded, {}

    @contextlib.contextmanager
    def spy(module, device):
        with real(module, device) as n:
            seen[module] = (n, sum(p.device.type == "meta" for p in module.parameters()), _checkpointing(module))
            yield n

    monkeypatch.setattr(offload, "frozen_weights_offloaded", spy)
    b = _train(off, imgs, offload=True)  # turns checkpointing on by itself
    encoders = [off.text_encoder] + ([off.text_encoder_2] if kind == "sdxl" else [])
    assert set(seen) == {off.unet, *encoders}  # the UNet and every text encoder
    for n_layers, n_meta, checkpointed in seen.values():
        assert n_layers > 0 and n_meta > 0 and checkpointed  # training really ran offloaded
    assert a.losses == b.losses
    assert a.delta.weights.keys() == b.delta.weights.keys()
    for n, w in a.delta.weights.items():
        assert torch.equal(w, b.delta.weights[n]), n
    assert torch.equal(a.delta.embeddings, b.delta.embeddings)
    if kind == "sdxl":
        assert torch.equal(a.delta.embeddings_2, b.delta.embeddings_2)
    # Afterwards the pipeline is whole again: real weights, no hooks, no checkpointing, the same modes.
    for name in ("unet", "text_encoder", "text_encoder_2"):
        mine, theirs = getattr(off, name, None), getattr(ref, name, None)
        if mine is None:
            continue
        for (n, p), (_, q) in zip(theirs.named_parameters(), mine.named_parameters()):
            assert p.device.type == "cpu" and torch.equal(p, q), n
        assert not any(hasattr(m, "_hf_hook") or "forward" in m.__dict__ for m in mine.modules())
        assert not _checkpointing(mine), name
        assert [m.training for m in mine.modules()] == [m.training for m in theirs.modules()], name
    assert not any(hasattr(te, "_require_grads_hook") for te in encoders)


def test_between_layer_runs_only_the_trainable_weights_stay_and_each_layer_runs_with_its_own():
    pipe = build_tiny_pipeline("sd1")
    unet = pipe.unet
    unet.requires_grad_(False)
    names = set(trainable_names(unet, "kv"))
    for n, p in unet.named_parameters():
        p.requires_grad_(n in names)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    x = torch.randn(1, 4, RES // 8, RES // 8)
    text = torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        expected = unet(x, 10, text).sample

    with offload.frozen_weights_offloaded(unet, "cpu") as n_layers:
        assert n_layers > 0
        off_device = {n for n, p in unet.named_parameters() if p.device.type == "meta"}
        assert off_device == set(before) - names  # everything but the trainable weights is off the device
        with torch.no_grad():
            out = unet(x, 10, text).sample
        # Each layer had its own weights while it ran (a meta weight would have made the output meta)...
        assert out.device.type == "cpu" and torch.equal(out, expected)
        # ...and dropped them again afterwards.
        assert {n for n, p in unet.named_parameters() if p.device.type == "meta"} == off_device
    for n, p in unet.named_parameters():
        assert torch.equal(p, before[n]), n


def test_resident_params_count_trainable_unblocked_and_the_largest_block():
    pipe = build_tiny_sdxl_pipeline()
    unet = pipe.unet
    unet.requires_grad_(False)
    names = set(trainable_names(unet, "kv"))
    for n, p in unet.named_parameters():
        p.requires_grad_(n in names)
    total = sum(p.numel() for p in unet.parameters())
    trainable = sum(p.numel() for n, p in unet.named_parameters() if n in names)
    resident = offload.resident_params(unet)
    assert trainable < resident < total
    # By hand: every parameter not inside a ResNet or transformer block, plus the biggest such block.
    blocks = {}
    outside = 0
    for n, p in unet.named_parameters():
        parts = n.split(".")
        for i, part in enumerate(parts[:-1]):
            if part in ("resnets", "transformer_blocks") and parts[i + 1].isdigit():
                key = ".".join(parts[: i + 2])
                if not p.requires_grad:
                    blocks[key] = blocks.get(key, 0) + p.numel()
                    break
        else:
            outside += p.numel()
            continue
        if p.requires_grad:
            outside += p.numel()
    assert resident == outside + max(blocks.values())


def test_a_checkpointed_text_encoder_recomputes_each_layer_in_the_backward_with_the_same_gradients():
    te = build_tiny_pipeline("sd1").text_encoder.eval()
    te.requires_grad_(False)
    rows = torch.nn.Parameter(torch.randn(1, te.config.hidden_size))
    te.get_input_embeddings().register_forward_hook(lambda m, i, out: out + rows)  # what the token rows do
    calls = []
    layer = getattr(te, "text_model", te).encoder.layers[0]  # transformers 5 flattened CLIPTextModel
    layer.mlp.fc1.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, te.config.vocab_size, (2, 16))

    def run():
        rows.grad, calls[:] = None, []
        out = te(ids)[0]
        out.square().sum().backward()
        return out.detach(), rows.grad.clone(), len(calls)

    plain = run()
    with offload.text_encoder_checkpointed(te):
        assert _checkpointing(te)
        checkpointed = run()
    assert (plain[2], checkpointed[2]) == (1, 2)  # recomputed in the backward
    assert torch.equal(plain[0], checkpointed[0]) and torch.equal(plain[1], checkpointed[1])
    assert not _checkpointing(te) and not any(m.training for m in te.modules())


def test_offload_with_cut_down_token_tables_as_cdiff_train_runs_it(tmp_path):
    """`cdiff train --offload` on a GPU: the cut-down tables (keep_pipe=False) are offloaded like any layer."""
    imgs = list_images(make_images(tmp_path / "a"))
    cfg = dict(steps=3, batch_size=2, lr=1e-3, resolution=RES)
    a = train(build_tiny_sdxl_pipeline(), [Concept("<a1>", "cat", imgs, reg=imgs)], TrainConfig(**cfg, gradient_checkpointing=True))
    pipe = build_tiny_sdxl_pipeline()
    b = train(pipe, [Concept("<a1>", "cat", imgs, reg=imgs)], TrainConfig(**cfg, offload=True), keep_pipe=False)
    assert type(pipe.text_encoder_2.get_input_embeddings()).__name__ == "UsedRows"
    assert a.losses == b.losses
    assert torch.equal(a.delta.embeddings_2, b.delta.embeddings_2)
    assert all(torch.equal(w, b.delta.weights[n]) for n, w in a.delta.weights.items())


def test_a_module_waiting_in_cpu_memory_goes_to_the_device_without_its_frozen_weights():
    """--low-memory/--offload load the base into CPU memory: offloading it must put every frozen tensor
    but the offloaded weights on the device ("meta" stands in for a GPU here) and bring it all back on
    exit. Trainable parameters are train()'s to place: it moves them in place before the optimizer
    holds them."""
    pipe = build_tiny_pipeline("sd1")
    unet, te = pipe.unet, pipe.text_encoder
    for m in (unet, te):
        m.requires_grad_(False)
    names = set(trainable_names(unet, "kv"))
    params = {n: p for n, p in unet.named_parameters() if n in names}
    for p in params.values():
        p.requires_grad_(True)
    before = {m: {n: t.detach().clone() for n, t in (*m.named_parameters(), *m.named_buffers())} for m in (unet, te)}
    assert any(True for _ in te.buffers())  # CLIP's position ids: a buffer of a module without weights

    for m in (unet, te):
        with offload.frozen_weights_offloaded(m, "meta") as n_layers:
            assert n_layers > 0
            # Nothing of the module is left in CPU memory but the hooks' copies of the frozen weights
            # and the trainable parameters, which stay where they were.
            assert all((t.device.type == "cpu") == (t.requires_grad and t.is_leaf) for t in (*m.parameters(), *m.buffers()))
            copies = {f"{n}.{k}" if n else k for n, sub in m.named_modules() if hasattr(sub, "_hf_hook")
                      for k, v in sub._hf_hook.weights_map.items() if v.device.type == "cpu"}
            frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
            assert copies == frozen
        for n, t in (*m.named_parameters(), *m.named_buffers()):
            assert t.device.type == "cpu" and torch.equal(t, before[m][n]), n
    # The trainable parameters are the very objects the optimizer holds.
    assert all(dict(unet.named_parameters())[n] is p for n, p in params.items())


def _same_device_on_cpu(monkeypatch):
    """diffusers names the execution device "cpu:0" on a CPU-only machine; accelerate's setter then copies
    each weight into a plain tensor instead of a parameter (on a GPU, "cuda:0" is the weight's own device
    and it does not): map it to "cpu", as the GPU case behaves."""
    import accelerate.hooks as hooks

    real = hooks.set_module_tensor_to_device
    monkeypatch.setattr(hooks, "set_module_tensor_to_device",
                        lambda module, name, device, *a, **k: real(module, name, "cpu" if str(device) == "cpu:0" else device, *a, **k))


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_regularisation_images_generated_with_cpu_offload_are_the_same_and_decoded_one_at_a_time(tmp_path, monkeypatch, mode):
    import numpy as np
    from PIL import Image

    from cdiff_cli.training.regularisation import generated_regularisation

    pipe = build_tiny_pipeline("sd1")
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    seen = {"hooked": [], "decodes": 0}
    pipe.unet.register_forward_pre_hook(lambda m, a: seen["hooked"].append(hasattr(m, "_hf_hook")))

    def count(*a):
        seen["decodes"] += 1

    pipe.vae.decoder.register_forward_pre_hook(count)
    kw = dict(class_word="cat", count=3, seed=0, resolution=RES, fingerprint="x", batch_size=2)
    plain = generated_regularisation(pipe, cache_root=tmp_path / "plain", **kw)
    assert not any(seen["hooked"]) and seen["decodes"] == 3  # batches of 2 and 1, one image per decode
    if mode == "sequential":
        _same_device_on_cpu(monkeypatch)
    seen["hooked"].clear()
    off = generated_regularisation(pipe, cache_root=tmp_path / "off", offload=(torch.device("cpu"), mode), **kw)
    assert seen["hooked"] and all(seen["hooked"])  # the UNet ran under diffusers' offload hooks
    for a, b in zip(plain, off):
        assert np.array_equal(np.asarray(Image.open(a.path)), np.asarray(Image.open(b.path)))
    # Afterwards: no hook anywhere, the weights unchanged and in CPU memory, slicing as it was.
    for name in ("unet", "text_encoder", "vae"):
        assert not any(hasattr(m, "_hf_hook") for m in getattr(pipe, name).modules()), name
    for n, p in pipe.unet.named_parameters():
        assert p.device.type == "cpu" and type(p) is torch.nn.Parameter and torch.equal(p, before[n]), n
    assert pipe.vae.use_slicing is False


@pytest.mark.parametrize("flags, mode", [({"low_memory": True}, "model"), ({"offload": True}, "sequential"), ({}, None)])
def test_on_a_gpu_low_memory_and_offload_keep_the_base_in_cpu_memory_until_each_phase(tmp_path, monkeypatch, sd1_base,
                                                                                       cat_images, flags, mode):
    """The wiring of `cdiff train` on a GPU, which CI has not: the GPU is a stand-in (what is loaded
    "onto" it stays on the CPU), and generation and training are spies (each is tested for what it does
    above and in test_train)."""
    import cdiff_cli.generation  # noqa: F401  (imported before base is patched: it binds pick_device)
    from cdiff_cli import training as train_mod
    from cdiff_cli.models import base as base_mod
    from cdiff_cli.registry import Registry
    from cdiff_cli.training import entry as entry_mod
    from cdiff_cli.training import regularisation as regset

    gpu = torch.device("cuda")
    seen = {}
    real_load = base_mod.load_pipeline

    def load(spec, *, dtype, device):
        seen["loaded onto"] = torch.device(device)
        return real_load(spec, dtype=dtype, device="cpu")

    def generation(pipe, **kw):
        seen["generation"] = (kw["batch_size"], kw["offload"])
        return []

    def training(pipe, concepts, cfg, *, device, **kw):
        seen["training on"] = device
        raise SystemExit  # far enough

    for module in (entry_mod, base_mod):
        monkeypatch.setattr(module, "pick_device", lambda device=None: gpu)
    monkeypatch.setattr(base_mod, "load_pipeline", load)
    monkeypatch.setattr(entry_mod, "_preflight", lambda *a, **k: None)
    monkeypatch.setattr(regset, "generated_regularisation", generation)
    monkeypatch.setattr(train_mod, "train", training)
    cfg = train_mod.TrainConfig(steps=1, batch_size=2, resolution=RES, precision="fp16", **flags)
    with pytest.raises(SystemExit):
        entry_mod.train_entry(Registry(tmp_path / "home"), "mycat", [entry_mod.ConceptSpec("<mycat>", "cat", cat_images)],
                              cfg, base=str(sd1_base), reg=entry_mod.RegOptions(count=4), device="cuda")
    if mode is None:  # by default the whole base goes onto the GPU, and generation runs there
        assert seen == {"loaded onto": gpu, "generation": (regset.BATCH, None), "training on": gpu}
    else:
        assert seen == {"loaded onto": torch.device("cpu"), "generation": (regset.BATCH_LOW_MEMORY, (gpu, mode)),
                        "training on": gpu}


def test_gen_low_memory_on_a_gpu_loads_into_cpu_memory_with_the_delta_and_offloads(tmp_path, monkeypatch, home, sd1_base,
                                                                                   cat_images):
    """`cdiff gen --low-memory/--offload` on a GPU (stood in for): the base waits in CPU memory with the
    concept's delta written in, under diffusers' offload onto the GPU, decoding one image at a time.
    On a CPU the flags change nothing and say so (`cdiff gen` runs there, below)."""
    from typer.testing import CliRunner

    from cdiff_cli import generation
    from cdiff_cli.cli import app
    from cdiff_cli.models import base as base_mod
    from cdiff_cli.progress import Progress
    from cdiff_cli.registry import Registry
    from cdiff_cli.training.entry import ConceptSpec, RegOptions, train_entry

    reg = Registry()
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-2, resolution=RES)
    entry, _ = train_entry(reg, "mycat", [ConceptSpec("<mycat>", "cat", cat_images)], cfg,
                           base=str(sd1_base), reg=RegOptions("none", None, 0), device="cpu")
    gen = ["gen", "a <mycat> cat", "--steps", "2", "--height", str(RES), "--width", str(RES), "--device", "cpu", "-o", tmp_path / "g"]
    plain, low = (CliRunner().invoke(app, [str(a) for a in gen + extra]) for extra in ([], ["--low-memory"]))
    assert plain.exit_code == 0 and low.exit_code == 0, low.output
    assert "for a CUDA GPU; generating without them" in low.stderr and "CUDA" not in plain.stderr
    a, b = (sorted((tmp_path / "g").glob("*.png")))
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))

    gpu = torch.device("cuda")
    real_load = base_mod.load_pipeline
    loaded = []

    def load(spec, *, dtype, device):
        loaded.append(torch.device(device))
        return real_load(spec, dtype=dtype, device="cpu")

    class Warnings(Progress):
        def warn(self, message):
            raise AssertionError(message)

    for module in (generation, base_mod):
        monkeypatch.setattr(module, "pick_device", lambda device=None: gpu)
    monkeypatch.setattr(base_mod, "load_pipeline", load)
    # (Sequential offload puts buffers on the device as it starts, which a CPU-only torch cannot stand in for.)
    _, pipe, delta = generation.prepare_pipeline(reg, [entry], device="cuda", precision="fp16", offload="model",
                                                 progress=Warnings())
    assert loaded[-1] == torch.device("cpu") and pipe._offload_device == torch.device("cuda:0")
    assert hasattr(pipe.unet, "_hf_hook") and pipe.vae.use_slicing
    weights = dict(pipe.unet.named_parameters())
    for name, w in delta.weights.items():  # the delta is in the weights the hooks bring to the GPU
        assert weights[name].device.type == "cpu" and torch.equal(weights[name], w.to(weights[name].dtype)), name
