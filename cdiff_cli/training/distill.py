"""Distillation on ordinary text: hold the UNet's predictions on the base's ordinary captions at the base's.

Prior preservation holds the images of "photo of a CLASS"; the anchor (`training.anchor`) holds what the k/v
layers make of ordinary text, measured in the text features. Neither measures what a person sees: on nano, the
anchor kept the k/v outputs on ordinary captions within 0.5 % of the base's and the pictures of those captions
still lost 8 points (docs/nano-world.md). Distillation measures the drift where it shows, in the UNet's
prediction: before the first step, the base predicts the noise of a bank of noised latents under ordinary
captions; each step then adds

    distill x mean ||unet(x_t, t, caption) - base(x_t, t, caption)||^2

over a few bank entries, so the weights that train stay where the base's behaviour on other text needs them.
The bank is made once, with a generator of its own (a resumed run makes the same one), from the run's
regularisation latents (else its target latents): the exact teacher's output makes any latent a fair input.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from cdiff_cli.core import textcond
from cdiff_cli.core.prompts import class_prompt

BANK_SIZE = 256  # entries made before the first step (on nano 1.2 s; SD 1.x at 512 px: a few seconds on a GPU)
BANK_BATCH = 16


@dataclass
class Bank:
    """Noised latents under ordinary captions, and the base's prediction for each."""

    noisy: torch.Tensor  # [N, C, H, W]
    t: torch.Tensor  # [N]
    text: torch.Tensor  # [N, L, D]: the k/v input features of each entry's caption
    pooled: torch.Tensor | None  # [N, P]: SDXL's pooled text, else None
    target: torch.Tensor  # [N, C, H, W], fp32

    def __len__(self) -> int:
        return int(self.t.shape[0])


CLASS_SHARE = 4  # one bank entry in this many holds a class prompt


def bank_captions(ordinary: list[str], class_words: list[str], n: int, seed: int) -> list[str]:
    """The bank's `n` captions: ordinary ones (`pick_captions`), and in one entry of `CLASS_SHARE` a class prompt
    ("photo of a circle"), each class in turn: the concept's class word is the ordinary word it most endangers (on
    nano, browncircle made "photo of a circle" brown). Pure function."""
    classes = [class_prompt(c) for c in dict.fromkeys(class_words) if c]
    n_class = n // CLASS_SHARE if classes else 0
    return pick_captions(ordinary, n - n_class, seed) + [classes[i % len(classes)] for i in range(n_class)]


def pick_captions(captions: list[str], n: int, seed: int) -> list[str]:
    """`n` captions for the bank: all of them in a shuffled order, as often as needed. Pure function."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        order = list(captions)
        rng.shuffle(order)
        out += order
    return out[:n]


@torch.no_grad()
def make_bank(pipe, unet, scheduler, latents: list, captions: list[str], *, seed: int, device, autocast=None,
              resolution: int = 0) -> Bank:
    """The bank for one run: an entry per caption of `captions` (`bank_captions`): a latent of `latents` noised at a
    uniform timestep, and the prediction of `unet` as it is now (the base's). `latents`: `training.latents.Latent`s."""
    if not latents or not captions:
        raise ValueError("distillation needs latents and captions")
    g = torch.Generator("cpu").manual_seed(seed * 7919 + 17)
    picks, size = list(captions), len(captions)
    dtype = unet.conv_in.weight.dtype
    noisy, ts, texts, pooled, targets = [], [], [], [], []
    for s in range(0, size, BANK_BATCH):
        chunk = picks[s : s + BANK_BATCH]
        which = torch.randint(0, len(latents), (len(chunk),), generator=g).tolist()
        x0 = torch.stack([latents[i].mean.cpu() + latents[i].std.cpu() * torch.randn(latents[i].std.shape, generator=g)
                          for i in which]).to(device) * pipe.vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(chunk),), generator=g).to(device)
        x_t = scheduler.add_noise(x0, noise, t)
        with autocast or nullcontext():
            hidden, pool, _ = textcond.encode(pipe, chunk, device)
            added = textcond.added_conditioning(pipe, pool, resolution) if pool is not None else None
            pred = unet(x_t.to(dtype), t, hidden, added_cond_kwargs=added).sample
        noisy.append(x_t)
        ts.append(t)
        texts.append(hidden)
        pooled.append(pool)
        targets.append(pred.float())
    return Bank(torch.cat(noisy), torch.cat(ts), torch.cat(texts),
                torch.cat(pooled) if pooled[0] is not None else None, torch.cat(targets))


def distill_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared difference from the base's prediction. Pure function."""
    return ((pred.float() - target.float()) ** 2).mean()
