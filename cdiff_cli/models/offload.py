"""`--offload`: the frozen weights stay in CPU memory and visit the GPU one layer at a time.

Custom Diffusion trains a few million parameters but must run the whole frozen UNet forward and
backward; on a small GPU its weights alone (1.7 GB for SD 1.x, 5 GB for SDXL in half precision) do not
leave room for the activations. accelerate's `AlignDevicesHook` (what diffusers' sequential CPU offload
uses for inference) copies a layer's weights to the GPU before the layer runs and drops them after.
For training that alone saves nothing: autograd keeps each layer's GPU weights for the backward. With
gradient checkpointing (which `--offload` turns on), the checkpointed blocks keep nothing; their
backward re-runs the block's forward, so its weights come back for that block only. What stays on the
GPU: the trainable layers, the few layers outside checkpointed blocks (input/output convolutions, up-
and down-samplers, the time embedding) and one block at a time (`resident_params`).

The text encoders run forward and backward every step too (the new tokens' rows get their gradient
through them), and SDXL's two hold 1.4 GB in half precision: they are offloaded the same way, with
transformers' own per-layer checkpointing (`text_encoder_checkpointed`).

Before training, the regularisation images are generated with diffusers' own CPU offload
(`pipeline_offloaded`), so no phase of a run needs the whole base on the GPU.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

# diffusers checkpoints each ResNet block and each transformer block (not the Transformer2DModel's
# own norm and projections), transformers each CLIP encoder layer: these are the units whose weights
# come and go one at a time.
_UNIT = re.compile(r"^(.*?\.(?:resnets|transformer_blocks|layers)\.\d+)\.")


def _frozen_leaves(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules holding parameters of their own, none of them trainable."""
    out = []
    for m in module.modules():
        own = list(m.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            out.append(m)
    return out


@contextmanager
def frozen_weights_offloaded(module: torch.nn.Module, device: torch.device | str) -> Iterator[int]:
    """While active, the frozen layers of `module` keep their weights in CPU memory (pinned when the
    device is a GPU) and copy them to `device` only while they run. The other frozen tensors (buffers,
    and weights beside trainable ones) are put on `device`, so a module waiting in CPU memory
    (`--low-memory`/`--offload` load the base there) never goes to the GPU whole; trainable parameters
    stay where the caller put them. Yields how many layers are offloaded; on exit every tensor is back
    on its device, bit-identical, and the layers' forwards are their own again.

    Drop other references to the frozen parameters first: a parameter something else still holds is
    not freed by being offloaded."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # as tensors name it, so placed ones are recognised
        device = torch.device("cuda", torch.cuda.current_device())
    pin = device.type == "cuda"
    hooked, moved = [], []  # moved: (the dict that held it, its name, the tensor), put back on exit
    try:
        for m in _frozen_leaves(module):
            if hasattr(m, "_hf_hook"):
                continue  # already under an accelerate hook (a device map, another offload): leave it alone
            weights = {}
            for name, p in m.named_parameters(recurse=False):
                cpu = p.detach().to("cpu")
                weights[name] = cpu.pin_memory() if pin else cpu
            # The hook also puts the layer's buffers on the device (and back on exit).
            add_hook_to_module(m, AlignDevicesHook(execution_device=device, offload=True, weights_map=weights))
            hooked.append(m)
        on_hooks = set(hooked)
        for m in module.modules():
            if m in on_hooks or hasattr(m, "_hf_hook"):
                continue
            for store in (m._parameters, m._buffers):
                for name, t in store.items():
                    if t is None or t.device == device or (store is m._parameters and t.requires_grad):
                        continue  # trainable parameters are the caller's to place (the optimizer holds them)
                    moved.append((store, name, t))
                    new = t.detach().to(device)
                    store[name] = torch.nn.Parameter(new, requires_grad=False) if store is m._parameters else new
        yield len(hooked)
    finally:
        for store, name, t in reversed(moved):
            store[name] = t  # the very tensor that was there (frozen: unchanged)
        for m in reversed(hooked):
            own_forward = m.__dict__.get("_old_forward")
            remove_hook_from_module(m)  # puts the weights back on their device
            # accelerate restores the old forward as an instance attribute; when that was the class's
            # own method, remove it so the module is exactly as before (and patchable again).
            if getattr(own_forward, "__func__", None) is getattr(type(m), "forward", None):
                m.__dict__.pop("forward", None)


@contextmanager
def text_encoder_checkpointed(text_encoder) -> Iterator[None]:
    """While active, each encoder layer of a transformers text encoder recomputes its forward in the
    backward instead of keeping what it computed (and, offloaded, its weights) alive.

    transformers checkpoints only in training mode, judged by the module that holds the flag (each
    layer in transformers 5, the encoder in 4.x): only those modules' own flags are set, not `.train()`,
    which would recurse into dropout, so the outputs are bit-identical."""
    te = text_encoder
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn).
    enable = getattr(te, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    flagged = [m for m in te.modules() if getattr(m, "gradient_checkpointing", False)]
    modes = [m.training for m in flagged]
    try:
        for m in flagged:
            m.training = True
        yield
    finally:
        for m, mode in zip(flagged, modes):
            m.training = mode
        (getattr(te, "activation_checkpointing_disable", None) or te.gradient_checkpointing_disable)()
        if hasattr(te, "_require_grads_hook"):  # enabling also made the embedding output require grad
            te.disable_input_require_grads()


def enable_pipeline_offload(pipe, device: torch.device | str, mode: str) -> None:
    """Inference with diffusers' own CPU offload from now on: "model" moves one whole model (text
    encoder, UNet, VAE) to `device` when it runs, "sequential" one layer at a time (the least memory,
    the most transfers). The pipeline's weights wait in CPU memory."""
    if mode not in ("model", "sequential"):
        raise ValueError(f"unknown offload mode {mode!r}")
    getattr(pipe, f"enable_{mode}_cpu_offload")(device=device)


@contextmanager
def pipeline_offloaded(pipe, device: torch.device | str, mode: str) -> Iterator[None]:
    """`enable_pipeline_offload` while active. On exit no hook is left and the weights are in CPU
    memory, where they were."""
    enable_pipeline_offload(pipe, device, mode)
    try:
        yield
    finally:
        pipe.remove_all_hooks()
        pipe.to("cpu", silence_dtype_warnings=True)  # model offload leaves the last model that ran on the device


@contextmanager
def frozen_parts_offloaded(unet: torch.nn.Module, text_encoders: list, device: torch.device | str) -> Iterator[None]:
    """`--offload`: the frozen weights of the UNet (whose checkpointing the caller turns on) and of the
    text encoders (checkpointed here) in CPU memory while active."""
    with ExitStack() as stack:
        for te in text_encoders:
            stack.enter_context(text_encoder_checkpointed(te))
            stack.enter_context(frozen_weights_offloaded(te, device))
        stack.enter_context(frozen_weights_offloaded(unet, device))
        yield


def resident_params(module: torch.nn.Module, trainable: set[str] | None = None) -> int:
    """Parameters of a UNet or text encoder on the GPU at the worst moment of an offloaded, checkpointed
    step: trainable ones (`trainable` names, or those that require grad), frozen ones outside
    checkpointed blocks (kept by autograd until the backward), and the largest checkpointed block,
    whose weights are back for its recomputed forward and its backward."""
    resident, units = 0, {}
    for name, p in module.named_parameters():
        unit = _UNIT.match(name)
        if (name in trainable if trainable is not None else p.requires_grad) or unit is None:
            resident += p.numel()
        else:
            units[unit.group(1)] = units.get(unit.group(1), 0) + p.numel()
    return resident + max(units.values(), default=0)
