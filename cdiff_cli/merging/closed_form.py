"""Closed-form multi-concept merge (Custom Diffusion, Sec. 3.2).

For each k/v layer, with W0 the base matrix and W_n concept n's fine-tuned one:

    minimise ||C_reg (W - W0)^T||_F   subject to   C W^T = V

C_reg holds text features of ordinary captions (only G = C_reg^T C_reg is needed), C the feature
rows of every concept's own prompts, V those rows mapped by their concept's W_n. Lagrange gives

    W = W0 + (V^T - W0 C^T) (C G^-1 C^T)^-1 C G^-1.

Stability (documented in the README): G gets a relative ridge `ridge * trace(G) / d` so it is always
invertible, rows of C that are duplicates (the shared "photo of a" prefix is identical for every
concept, since the text encoder is causal) are kept once with the mean of their targets, and the
small system is solved in float64 with a tiny relative jitter. The merge is computed on CPU.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file

from cdiff_cli.core import textcond
from cdiff_cli.core.delta import Delta, add_delta_tokens
from cdiff_cli.core.layers import kv_names
from cdiff_cli.core.prompts import class_prompt, merge_constraint_prompts
from cdiff_cli.core.tokens import shared_token
from cdiff_cli.defaults import DEFAULT_RIDGE  # noqa: E402  (re-exported)
from cdiff_cli.errors import CdiffError
from cdiff_cli.files import save_tensors
from cdiff_cli.progress import SILENT, Progress

_JITTER = 1e-9
_DUP_TOL = 1e-6


def duplicate_groups(C: torch.Tensor, tol: float = _DUP_TOL) -> list[list[int]]:
    """Indices of C's rows grouped by (near-)equality, in order of first appearance."""
    groups: list[list[int]] = []
    for i, c in enumerate(C):
        for g in groups:
            kc = C[g[0]]
            if torch.linalg.vector_norm(c - kc) <= tol * max(1.0, float(torch.linalg.vector_norm(kc))):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def dedupe_rows(C: torch.Tensor, V: torch.Tensor, tol: float = _DUP_TOL) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each (near-)duplicate row of C once; its target is the mean of the duplicates' targets."""
    groups = duplicate_groups(C, tol)
    return torch.stack([C[g[0]] for g in groups]), torch.stack([V[g].mean(0) for g in groups])


class MergeSystem:
    """The parts of the solve shared by every layer: they depend only on C and G, not on W0 or V.

    Factorising once and reusing for all 32 k/v layers of SD 1.x makes a merge a few matrix products
    per layer instead of two dense solves.
    """

    def __init__(self, C: torch.Tensor, G: torch.Tensor, ridge: float = DEFAULT_RIDGE):
        dt = torch.float64
        C, G = C.to(dt), G.to(dt)
        self.groups = duplicate_groups(C)
        Cd = torch.stack([C[g[0]] for g in self.groups])
        d = G.shape[0]
        Gr = G + (ridge * torch.trace(G) / d + _JITTER) * torch.eye(d, dtype=dt)
        self.GinvCt = torch.linalg.solve(Gr, Cd.T)  # [in, m]
        K = Cd @ self.GinvCt  # [m, m], symmetric positive definite when Cd has full row rank
        K = K + _JITTER * torch.trace(K) / K.shape[0] * torch.eye(K.shape[0], dtype=dt)
        self.K_chol = torch.linalg.cholesky(K)
        self.Cd = Cd

    def solve(self, W0: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """W = W0 + (V^T - W0 C^T) K^-1 C G^-1 for one layer; V holds C's targets ([m, out])."""
        W0d = W0.to(torch.float64)
        Vd = torch.stack([V[g].to(torch.float64).mean(0) for g in self.groups])
        R = Vd.T - W0d @ self.Cd.T  # [out, m]: what the constraints still need
        X = torch.cholesky_solve(R.T, self.K_chol)  # K^-1 R^T: [m, out]
        return (W0d + X.T @ self.GinvCt.T).to(W0.dtype)


def constrained_merge(
    W0: torch.Tensor,
    C: torch.Tensor,
    V: torch.Tensor,
    G: torch.Tensor,
    ridge: float = DEFAULT_RIDGE,
) -> torch.Tensor:
    """Solve the merge for one layer. W0 [out, in]; C [m, in]; V [m, out]; G [in, in]. Pure function."""
    return MergeSystem(C, G, ridge).solve(W0, V)


# -- text features ----------------------------------------------------------------------------------


@torch.no_grad()
def prompt_features(pipe, prompts: list[str], batch_size: int = 64) -> list[torch.Tensor]:
    """For each prompt, the text features its k/v layers read (the final text-encoder states; for SDXL
    both encoders' penultimate states, concatenated: see cdiff_cli.core.textcond), from after the start token
    up to and including the first end token (no padding rows). Returns float32 CPU tensors [n_i, dim]."""
    out = []
    eos = pipe.tokenizer.eos_token_id
    device = next(pipe.text_encoder.parameters()).device
    for s in range(0, len(prompts), batch_size):
        hidden, _, ids = textcond.encode(pipe, prompts[s : s + batch_size], device, padding="longest")
        for row_ids, f in zip(ids.cpu(), hidden.float().cpu()):
            end = int((row_ids == eos).nonzero()[0]) if bool((row_ids == eos).any()) else len(row_ids) - 1
            out.append(f[1 : end + 1])
    return out


def gram(rows: list[torch.Tensor]) -> torch.Tensor:
    X = torch.cat(rows).double()
    return X.T @ X


def regulariser_gram(pipe, captions: list[str], cache_dir: Path | None, fingerprint: str) -> torch.Tensor:
    """G = C_reg^T C_reg over the shipped captions, cached per (base, caption set)."""
    key = hashlib.sha256(("\n".join(captions) + fingerprint).encode()).hexdigest()[:16]
    path = cache_dir / f"gram-{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        return load_file(str(path))["gram"]
    G = gram(prompt_features(pipe, captions))
    if path is not None:
        tmp = path.with_suffix(".tmp")
        try:
            save_tensors({"gram": G.contiguous()}, tmp)
            tmp.replace(path)
        except OSError:  # a cache that cannot be written costs only the time
            tmp.unlink(missing_ok=True)
    return G


def concept_prompts(token: str, class_word: str, captions: list[str] = ()) -> list[str]:
    return merge_constraint_prompts(token, class_word, captions)


def merge_deltas(
    pipe,
    deltas: list[Delta],
    classes: list[list[str]],
    *,
    G: torch.Tensor,
    ridge: float = DEFAULT_RIDGE,
    captions: list[list[list[str]]] | None = None,
    pin: list[str] | None = None,
    progress: Progress = SILENT,
) -> tuple[Delta, list[str]]:
    """Merge several deltas of the same base. `pipe` must hold the base weights; its tokenizer and
    text encoder get every concept's token. With one delta, the result is that concept constrained: its k/v
    outputs on its own prompts are kept exactly, and on everything else held as near the base as the
    constraint allows (see `constrain_delta`). `captions`: per delta, per token, the target images' own
    captions it was trained on (constrained as well). `pin`: prompts held near the base with the weight of
    all the ordinary captions together (`pinned_gram`); by default, with one delta, its class prompts. Returns the merged delta and notes for the user."""
    if not deltas:
        raise CdiffError("nothing to merge")
    if shared := shared_token([d.tokens for d in deltas]):
        raise CdiffError(f"token {shared[0]!r} is used by two of the concepts being merged; rename one (cdiff add --token)")
    tokens = [t for d in deltas for t in d.tokens]
    embeddings = torch.cat([d.embeddings for d in deltas])
    seconds = [d.embeddings_2 for d in deltas]
    if any(e is None for e in seconds) and any(e is not None for e in seconds):
        raise CdiffError("concepts trained on SDXL cannot be merged with concepts trained on SD 1.x/2.x")
    embeddings_2 = torch.cat(seconds) if seconds[0] is not None else None
    add_delta_tokens(pipe, tokens, embeddings, embeddings_2)

    # C_n, the rows of concept n's own prompts, each computed with all tokens present.
    C_parts = []
    captions = captions or [[] for _ in deltas]
    for d, cls, caps in zip(deltas, classes, captions):
        own = list(caps) + [[] for _ in range(len(d.tokens) - len(caps))]
        prompts = [p for t, c, o in zip(d.tokens, cls, own) for p in concept_prompts(t, c, o)]
        C_parts.append(torch.cat(prompt_features(pipe, prompts)).double())
    names = sorted({n for d in deltas for n in d.weights})
    params = dict(pipe.unet.named_parameters())
    base = {n: params[n].detach().cpu().float() for n in names}  # only the merged layers, not all 860 M
    C = torch.cat(C_parts)
    if pin is None:  # one concept alone: its class prompt too is held near the base (constrain_delta)
        pin = [class_prompt(c) for c in classes[0] if c] if len(deltas) == 1 else []
    G = pin_prompts(pipe, G, pin)
    system = MergeSystem(C, G, ridge)
    notes: list[str] = []
    merged: dict[str, torch.Tensor] = {}
    with progress.task("merging layers", len(names)) as bar:
        for name in names:
            W0 = base[name]
            if name in kv_names([name]):
                V = torch.cat([Cn @ d.weights.get(name, W0).double().T for Cn, d in zip(C_parts, deltas)])
                merged[name] = system.solve(W0, V).float()
            else:
                # q/out projections never see text features: no constraint applies, sum the deltas.
                merged[name] = W0 + sum(d.weights.get(name, W0).float() - W0 for d in deltas)
            bar.advance(1)
    if any(n not in kv_names([n]) for n in names):
        notes.append("to_q/to_out weights (crossattn mode) were combined by summing their deltas")
    mode = "crossattn" if any(d.mode == "crossattn" for d in deltas) else "kv"
    return Delta(merged, tokens, embeddings, mode, embeddings_2=embeddings_2), notes


def constrain_delta(pipe, delta: Delta, classes: list[str], *, G: torch.Tensor, ridge: float = DEFAULT_RIDGE,
                    captions: list[list[str]] | None = None, progress: Progress = SILENT) -> Delta:
    """One concept's delta, projected as the merge projects several: the k/v weights closest to the base on the
    ordinary captions (`G`) whose outputs on the concept's own prompts are the trained ones, with the plain class
    prompt ("photo of a cat") pinned near the base: the ordinary captions hold it only on average (on nano,
    browncircle's "photo of a circle" gave the concept in 16 % of images unpinned, 8 % pinned, the base 8 %)."""
    return merge_deltas(pipe, [delta], [classes], G=G, ridge=ridge, captions=[captions or []], progress=progress)[0]


def pinned_gram(G: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """G with `rows` (a prompt's features) weighted as much as all of G: the solve then holds that prompt near the
    base as far as the hard constraints allow. A soft pin, not a constraint: where a pinned row lies close to a
    constrained one, the constraint wins (a hard pin there moved ordinary captions more than the raw delta did)."""
    R = rows.to(G.dtype)
    P = R.T @ R
    weight = torch.trace(P)
    return G + (torch.trace(G) / weight) * P if weight > 0 else G


def pin_prompts(pipe, G: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """G with `prompts` pinned (`pinned_gram` of their features); G itself when there are none."""
    return pinned_gram(G, torch.cat(prompt_features(pipe, list(prompts)))) if prompts else G


def constraint_residual(W: torch.Tensor, C: torch.Tensor, V: torch.Tensor) -> float:
    """max |C W^T - V| / max |V| over the deduplicated constraints (for tests and reports)."""
    Cd, Vd = dedupe_rows(C.double(), V.double())
    return float((Cd @ W.double().T - Vd).abs().max() / Vd.abs().max())
