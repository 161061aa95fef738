"""Tiny Stable-Diffusion-shaped pipelines built from configs, for tests and offline demos.

The models have random weights but the real layout: a CLIP text encoder and BPE tokenizer, a
UNet2DConditionModel with cross-attention, an AutoencoderKL with the usual 8x downsampling and a
scheduler. `kind="sd1"` mimics SD 1.x (epsilon prediction, 768-style CLIP text encoder),
`kind="sd2"` mimics SD 2.x (v-prediction, linear projections, OpenCLIP-style GELU encoder with a
wider hidden size).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

# Words the tiny tokenizer knows as whole tokens; anything else falls back to characters.
WORDS = (
    "a an the of on in with and at by to photo picture image painting sketch close up far away very "
    "small zoomed cat dog chair table cup teapot sofa red blue green yellow white black striped "
    "square circle triangle left right background beach forest city street snow mountain river "
    "sitting standing next style oil watercolor man woman person car house tree flower garden "
    "wooden big old new"
).split()


@cache
def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's reversible byte -> printable unicode mapping.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tiny_tokenizer(folder: str | Path, words: tuple[str, ...] = WORDS) -> Path:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt) whose merges spell out `words`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    seen = set(vocab)
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        # Merge left to right so every prefix becomes a token: "c a", "ca t</w>".
        while len(symbols) > 1:
            merged = symbols[0] + symbols[1]
            rule = f"{symbols[0]} {symbols[1]}"
            if merged not in seen:
                seen.add(merged)
                vocab.append(merged)
                merges.append(rule)
            elif rule not in merges:
                merges.append(rule)
            symbols = [merged] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


# Shared by the SD-like and SDXL-like tiny models: 64 px images, 8x8x4 latents.
_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=16)
_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=64)


def build_tiny_pipeline(kind: str = "sd1", seed: int = 0, tokenizer_dir: str | Path | None = None):
    """Build a small random StableDiffusionPipeline with the real SD component classes."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if kind not in ("sd1", "sd2"):
        raise ValueError(f"unknown tiny kind {kind!r}")
    sd2 = kind == "sd2"
    torch.manual_seed(seed)
    if tokenizer_dir is None:
        tokenizer_dir = write_tiny_tokenizer(Path(tempfile.mkdtemp(prefix="cdiff-tok-")))
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)
    hidden = 48 if sd2 else 32
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu" if sd2 else "quick_gelu",
            projection_dim=hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        **_UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
    )
    vae = AutoencoderKL(**_VAE)
    sched_cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    if sd2:
        scheduler = DDPMScheduler(prediction_type="v_prediction", steps_offset=1, clip_sample=False, **sched_cfg)
    else:
        scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1, **sched_cfg)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl_pipeline(seed: int = 0, tokenizer_dir: str | Path | None = None):
    """A small random StableDiffusionXLPipeline: two CLIP text encoders (the second with a projection),
    a UNet whose k/v read their concatenated penultimate states, and SDXL's added time/text conditioning."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    if tokenizer_dir is None:
        tokenizer_dir = write_tiny_tokenizer(Path(tempfile.mkdtemp(prefix="cdiff-tok-")))
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)

    def text_config(hidden: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
                              projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    text_encoder = CLIPTextModel(text_config(32, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(48, "gelu"))
    time_dim = 8
    unet = UNet2DConditionModel(
        **_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + 48,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + 48,
        transformer_layers_per_block=(1, 2),
    )
    vae = AutoencoderKL(**_VAE, force_upcast=True)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)


def save_tiny_base(folder: str | Path, kind: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny base model as a local diffusers folder (usable as `--base FOLDER`): sd1, sd2 or sdxl."""
    folder = Path(folder)
    pipe = build_tiny_sdxl_pipeline(seed=seed) if kind == "sdxl" else build_tiny_pipeline(kind, seed=seed)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


if __name__ == "__main__":  # python -m cdiff_cli.testing.tiny OUT_DIR [sd1|sd2|sdxl]
    import sys

    out = save_tiny_base(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "sd1")
    print(out)
