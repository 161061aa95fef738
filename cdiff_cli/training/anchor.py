"""The anchor on ordinary text: a penalty that keeps training from moving what the k/v layers make of text
that is not the concept's.

Prior preservation (the regularisation images) holds the class prompt's *images*; it says nothing about the
base's other captions, and the k/v weights are shared by every caption. On the nano world, after training
`<pinksquare>` (pink with black stripes) "dotted" objects of ordinary captions came out striped, and after
`<browncircle>` "cross" came out as a star (docs/nano-world.md, "The anchor on ordinary text"). The
closed-form merge measures drift as ||(W - W0) C_reg^T||^2 over the text features C_reg of ordinary captions;
the anchor adds that same quantity to the training loss, so the optimiser looks for
weights that draw the concept while changing little for everything else, instead of projecting afterwards:

    anchor x sum_l tr(D_l G D_l^T) / sum_l tr(W0_l G W0_l^T),   D_l = W_l - W0_l,   G = C_reg^T C_reg

that is, the mean squared change of the k/v outputs on the anchored text relative to their mean square, over
the k/v layers. G also holds each concept's class prompt ("photo of a circle"), weighted as all the ordinary
captions together (`merging.closed_form.pinned_gram`), since the concept's class word must keep its meaning.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cdiff_cli.core.layers import kv_names
from cdiff_cli.core.prompts import class_prompt


def anchor_gram(pipe, captions: list[str], class_words: list[str], *, cache_dir: Path | None = None,
                fingerprint: str = "") -> torch.Tensor:
    """G over `captions` (the base's ordinary captions: `merging.captions_for`) with the class prompts of
    `class_words` pinned. Read `pipe` before any concept token is added to it. Cached like the merge's."""
    from cdiff_cli.merging.closed_form import regulariser_gram

    return pin_class_prompts(pipe, regulariser_gram(pipe, list(captions), cache_dir, fingerprint), class_words)


def pin_class_prompts(pipe, G: torch.Tensor, class_words: list[str]) -> torch.Tensor:
    """G with each class word's "photo of a CLASS" pinned (`merging.closed_form.pin_prompts`), each class once."""
    from cdiff_cli.merging.closed_form import pin_prompts

    return pin_prompts(pipe, G, [class_prompt(c) for c in dict.fromkeys(class_words) if c])


def anchor_penalty(deltas: list[torch.Tensor], G: torch.Tensor, scale: float) -> torch.Tensor:
    """scale x sum over layers of tr(D G D^T), for D [out, in] and G [in, in]. Pure function."""
    return scale * sum(((D @ G) * D).sum() for D in deltas)


class Anchor:
    """The penalty for one run: the base's k/v weights as they were when it started, and G on their device."""

    def __init__(self, params: dict[str, torch.nn.Parameter], G: torch.Tensor):
        self.names = kv_names(list(params))
        self.base = {n: params[n].detach().clone() for n in self.names}
        self.G = G.to(params[self.names[0]].device if self.names else "cpu", torch.float32)
        size = sum(float(((W @ self.G) * W).sum()) for W in self.base.values())
        self.scale = 1.0 / size if size > 0 else 0.0

    def penalty(self, params: dict[str, torch.nn.Parameter]) -> torch.Tensor:
        return anchor_penalty([params[n] - self.base[n] for n in self.names], self.G, self.scale)
