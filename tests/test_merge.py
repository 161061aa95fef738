"""The closed-form merge satisfies its constraints and beats the plain sum of deltas."""

import pytest
import torch

from cdiff_cli.core.delta import Delta
from cdiff_cli.core.layers import kv_names, read_weights, trainable_names
from cdiff_cli.core.tokens import add_tokens
from cdiff_cli.errors import CdiffError
from cdiff_cli.merging import (
    concept_prompts,
    constrained_merge,
    constraint_residual,
    dedupe_rows,
    gram,
    merge_deltas,
    prompt_features,
)
from cdiff_cli.merging.captions import load_captions
from cdiff_cli.merging.closed_form import constrain_delta
from cdiff_cli.testing.tiny import build_tiny_pipeline


def test_pure_merge_satisfies_constraints_and_minimises_drift():
    g = torch.Generator().manual_seed(0)
    d_in, d_out = 16, 12
    C_reg = torch.randn(400, d_in, generator=g, dtype=torch.float64)
    G = C_reg.T @ C_reg
    W0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    W1 = W0 + 0.3 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    W2 = W0 + 0.3 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    C1, C2 = torch.randn(3, d_in, generator=g, dtype=torch.float64), torch.randn(3, d_in, generator=g, dtype=torch.float64)
    C = torch.cat([C1, C2])
    V = torch.cat([C1 @ W1.T, C2 @ W2.T])
    W = constrained_merge(W0, C, V, G, ridge=1e-6)
    assert constraint_residual(W, C, V) < 1e-6
    # Objective: drift on ordinary captions is smaller than that of the plain sum of deltas...
    drift = lambda M: torch.linalg.matrix_norm(C_reg @ (M - W0).T)  # noqa: E731
    W_sum = W0 + (W1 - W0) + (W2 - W0)
    assert drift(W) < drift(W_sum)
    # ...and the sum breaks the constraints the merge keeps.
    assert constraint_residual(W_sum, C, V) > 0.1
    # Lagrange optimality: no feasible perturbation lowers the objective (check random feasible directions).
    null = torch.linalg.svd(C, full_matrices=True).Vh[C.shape[0]:]  # directions D with C D^T = 0
    for _ in range(5):
        D = torch.randn(d_out, null.shape[0], generator=g, dtype=torch.float64) @ null
        assert drift(W + 1e-3 * D) >= drift(W) - 1e-9


def test_duplicate_rows_are_kept_once_with_mean_target():
    C = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    V = torch.tensor([[2.0], [3.0], [4.0]], dtype=torch.float64)
    Cd, Vd = dedupe_rows(C, V)
    assert Cd.shape == (2, 2)
    assert Vd[:, 0].tolist() == [3.0, 3.0]
    # A merge whose constraints contain exact duplicates still solves (singular without dedupe).
    W0 = torch.zeros(1, 2, dtype=torch.float64)
    W = constrained_merge(W0, C, V, torch.eye(2, dtype=torch.float64), ridge=0.0)
    assert torch.allclose(W, torch.tensor([[3.0, 3.0]], dtype=torch.float64), atol=1e-6)


def _synthetic_delta(pipe, token, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    names = trainable_names(pipe.unet, "kv")
    base = read_weights(pipe.unet, names)
    weights = {n: w + scale * torch.randn(w.shape, generator=g) for n, w in base.items()}
    emb = torch.randn(1, pipe.text_encoder.config.hidden_size, generator=g)
    return Delta(weights, [token], emb, "kv")


def test_merge_deltas_on_a_tiny_pipeline():
    pipe = build_tiny_pipeline("sd1")
    W0 = read_weights(pipe.unet, trainable_names(pipe.unet, "kv"))
    captions = list(load_captions())
    G = gram(prompt_features(pipe, captions[:600]))
    d1, d2 = _synthetic_delta(pipe, "<a1>", 1), _synthetic_delta(pipe, "<b2>", 2)
    merged, notes = merge_deltas(pipe, [d1, d2], [["cat"], ["chair"]], G=G, ridge=1e-5)
    assert merged.tokens == ["<a1>", "<b2>"] and not notes
    assert torch.equal(merged.embeddings[1], d2.embeddings[0])
    # Constraint rows: each concept's prompts, computed with every token present.
    C_parts = [torch.cat(prompt_features(pipe, concept_prompts(t, c)))
               for t, c in (("<a1>", "cat"), ("<b2>", "chair"))]
    held_out = torch.cat(prompt_features(pipe, captions[600:900]))
    for name in kv_names(merged.weights):
        C = torch.cat(C_parts)
        V = torch.cat([C_parts[0] @ d1.weights[name].T, C_parts[1] @ d2.weights[name].T])
        # The shared "photo of a" prefix rows conflict, so they hold as a mean; the concept rows hold exactly.
        own = [torch.cat(prompt_features(pipe, [f"{t} {c}"])) for t, c in (("<a1>", "cat"), ("<b2>", "chair"))]
        for rows, d in zip(own, (d1, d2)):
            err = (rows @ merged.weights[name].T - rows @ d.weights[name].T).abs().max()
            assert err < 1e-3 * (rows @ d.weights[name].T).abs().max(), name
        assert constraint_residual(merged.weights[name], C, V) < 1e-3
        # Better than the plain sum of deltas on held-out ordinary captions.
        W_sum = W0[name] + (d1.weights[name] - W0[name]) + (d2.weights[name] - W0[name])
        drift_merge = torch.linalg.matrix_norm(held_out @ (merged.weights[name] - W0[name]).T)
        drift_sum = torch.linalg.matrix_norm(held_out @ (W_sum - W0[name]).T)
        assert drift_merge < drift_sum, name


def test_one_concept_constrained_keeps_its_prompts_and_pins_its_class_prompt():
    """`constrain_delta`: the trained outputs on the concept's own prompts exactly; "photo of a cat" moved less than
    without the pin (its "photo of a" rows are shared with the concept's prompt, so it cannot reach the base)."""
    pipe = build_tiny_pipeline("sd1")
    W0 = read_weights(pipe.unet, trainable_names(pipe.unet, "kv"))
    G = gram(prompt_features(pipe, list(load_captions())[:600]))
    d = _synthetic_delta(pipe, "<a1>", 1)
    pinned = constrain_delta(pipe, d, ["cat"], G=G, ridge=1e-5)
    plain, _ = merge_deltas(pipe, [d], [["cat"]], G=G, ridge=1e-5, pin=[])
    own = torch.cat(prompt_features(pipe, concept_prompts("<a1>", "cat")))
    cls = prompt_features(pipe, ["photo of a cat"])[0]
    moved = {"pinned": 0.0, "plain": 0.0}
    for name in kv_names(pinned.weights):
        want = own @ d.weights[name].T
        assert (own @ pinned.weights[name].T - want).abs().max() < 1e-3 * want.abs().max(), name
        for label, k in (("pinned", pinned), ("plain", plain)):
            moved[label] += float(torch.linalg.matrix_norm(cls @ (k.weights[name] - W0[name]).T))
    assert moved["pinned"] < 0.95 * moved["plain"], moved


def test_merge_refuses_token_collisions():
    pipe = build_tiny_pipeline("sd1")
    d1, d2 = _synthetic_delta(pipe, "<a1>", 1), _synthetic_delta(pipe, "<A1>", 2)
    with pytest.raises(CdiffError, match="used by two"):
        merge_deltas(pipe, [d1, d2], [["cat"], ["dog"]], G=torch.eye(32, dtype=torch.float64))


def test_feature_rows_stop_at_first_end_token():
    pipe = build_tiny_pipeline("sd1")
    add_tokens(pipe.tokenizer, pipe.text_encoder, ["<a1>"])
    rows = prompt_features(pipe, ["photo of a <a1> cat", "cat"])
    n_tok = [len(pipe.tokenizer(p, add_special_tokens=False).input_ids) for p in ("photo of a <a1> cat", "cat")]
    assert [r.shape[0] for r in rows] == [n + 1 for n in n_tok]  # the tokens plus the end token


def test_factorised_solve_matches_the_closed_form_written_out():
    """W = W0 + (V^T - W0 C^T) (C G^-1 C^T)^-1 C G^-1, with explicit inverses, on a well-posed system."""
    g = torch.Generator().manual_seed(3)
    d_in, d_out, m = 10, 7, 4
    X = torch.randn(200, d_in, generator=g, dtype=torch.float64)
    G = X.T @ X
    W0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    C = torch.randn(m, d_in, generator=g, dtype=torch.float64)
    V = torch.randn(m, d_out, generator=g, dtype=torch.float64)
    Gi = torch.linalg.inv(G)
    expected = W0 + (V.T - W0 @ C.T) @ torch.linalg.inv(C @ Gi @ C.T) @ C @ Gi
    assert torch.allclose(constrained_merge(W0, C, V, G, ridge=0.0), expected, atol=1e-6)


def test_merge_constrains_the_prompt_the_concept_was_trained_on():
    """The merge is only right when its constraint rows are the training caption's features: both come from
    cdiff_cli.core.prompts, and the caption a concept trains on is one of the merge's constraint prompts."""
    from cdiff_cli.core.prompts import class_prompt
    from cdiff_cli.merging import concept_prompts
    from cdiff_cli.training import Concept

    c = Concept(token="<mycat>", class_word="cat", images=[])
    assert c.prompt == "photo of a <mycat> cat"
    assert c.prompt in concept_prompts("<mycat>", "cat")
    assert c.reg_caption is not None and class_prompt("cat") == "photo of a cat"


def test_a_world_base_regularises_the_merge_with_its_own_captions():
    """On nano the shipped English captions fall apart into letters; the merge keeps the world's captions
    instead, and that holds held-out world captions nearer the base than the shipped captions do."""
    from cdiff_cli.merging.captions import captions_for
    from cdiff_cli.models.base import load_pipeline, resolve_base
    from cdiff_cli.world.scores import ordinary_prompts

    ref = resolve_base("nano").ref
    world = captions_for(ref)
    assert captions_for(None) == load_captions() and world != load_captions()
    assert len(world) == 1000 and not set(world) & set(ordinary_prompts())  # the drift score's captions stay unseen
    pipe = load_pipeline("nano")
    vocab = pipe.tokenizer.get_vocab()
    words = {w for c in world for w in c.replace(",", " ,").split()}
    assert all(f"{w}</w>" in vocab for w in words)  # every word is one token of the base's own vocabulary
    delta = _synthetic_delta(pipe, "<w1>", 3, scale=0.02)
    held_out = torch.cat(prompt_features(pipe, ordinary_prompts(24))).double()
    W0 = read_weights(pipe.unet, list(delta.weights))
    drift = {}
    for label, captions in (("world", world), ("shipped", load_captions())):
        G = gram(prompt_features(pipe, list(captions)))
        merged, _ = merge_deltas(load_pipeline("nano"), [delta], [["square"]], G=G)
        drift[label] = sum(float(torch.linalg.matrix_norm(held_out @ (merged.weights[n] - W0[n]).double().T))
                           for n in kv_names(merged.weights))
    raw = sum(float(torch.linalg.matrix_norm(held_out @ (delta.weights[n] - W0[n]).double().T)) for n in kv_names(W0))
    # measured: raw 856, shipped captions 354, the world's 180
    assert drift["world"] < 0.6 * drift["shipped"] < 0.6 * raw, (drift, raw)
