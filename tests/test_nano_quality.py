"""The method works on the shipped nano model, as the oracle reads the pictures: one concept trained with the
demo's settings (a pink square with black stripes) appears where prompts place it in new contexts, while
the base draws it for none of those prompts, the plain class prompt seldom turns into the concept, and
ordinary captions are drawn about as before (drift); constrained by the closed form, it keeps most of its
presence and gives back most of that drift.

Thresholds sit below the values measured on the shipped model (in the comments), so that a change that
breaks learning or regularisation fails while seed-level noise does not. The full picture, over several
seeds and methods, is benchmarks/quality_nano.py."""

import torch

from cdiff_cli import world
from cdiff_cli.core.delta import apply_delta
from cdiff_cli.core.layers import fingerprint
from cdiff_cli.evaluation.prompts import strip_tokens
from cdiff_cli.generation import sample, set_scheduler
from cdiff_cli.merging import constrain_delta, regulariser_gram
from cdiff_cli.merging.captions import captions_for
from cdiff_cli.models.base import load_pipeline, resolve_base
from cdiff_cli.training import Concept, TrainConfig, train
from cdiff_cli.training.images import list_images
from cdiff_cli.training.regularisation import generated_regularisation
from cdiff_cli.world import oracle as O
from cdiff_cli.world import scores as WE
from cdiff_cli.world.demo import DemoSettings

NAME, TOKEN = "pinksquare", "<pinksquare>"
# Measured on the shipped model (run 4, the demo's 600 steps and 64 regularisation images, seed 0, 20 images of 10
# new-context prompts, eight photos on every background at both sizes, each with its mask, background weight 0.3;
# 2026-12-06): the concept in 15 of 20 (base 0 of 20); the rest of each prompt right in 20 of 20; "photo of a square"
# gave it in 0 of 8; objects on ordinary captions right in 58 % against the base's 83 % (a drop of 25 points on 12
# images, where one image is 8 points; the 13-seed mean is 13 ± 4 on 48 images per seed). With six photos: 15 of
# 20 and 25; without masks: 17 of 20 and 33. About 120 s on 2 cores.
MIN_PRESENCE = 0.6  # share of images of new-context prompts in which the oracle reads the concept
MAX_BASE_PRESENCE = 0.1  # the base, same prompts without the token
MAX_CLASS_PRESENCE = 0.25  # "photo of a square" gives the concept
MAX_ORDINARY_DROP = 42  # points lost on ordinary world captions (measured 25, 33 without masks)
# The same concept constrained by the closed form (`cdiff merge NAME`; the world's captions as regulariser, the
# class prompt pinned), measured: the concept in 15 of 20, objects on ordinary captions right in 83 % (a change of 0
# points, from 25; with six photos 17 of 20 and a drop of 17; without masks a drop of 8). About 20 s more.
MIN_CONSTRAINED_PRESENCE = 0.6
MAX_CONSTRAINED_DROP = 25  # as measured with six photos plus one image (the 13-seed mean is -1 ± 3 on 48 images)


def _images(pipe, prompts, n=2, seed=0):
    s = DemoSettings()
    return {p: sample(pipe, p, n=n, steps=s.sample_steps, guidance=s.guidance, seed=seed + 10 * i)
            for i, p in enumerate(prompts)}


def _all_images(pipe, prompts, class_prompt, ordinary):
    """The new-context prompts (2 images each), the class prompt (8) and the ordinary captions (1 each)."""
    return {**_images(pipe, prompts), **_images(pipe, [class_prompt], n=8, seed=500), **_images(pipe, ordinary, n=1, seed=700)}


def test_one_concept_is_learned_and_its_class_kept(tmp_path):
    torch.manual_seed(0)
    s = DemoSettings()
    c = world.CONCEPTS[NAME]
    folder = tmp_path / NAME
    world.save_concept_images(NAME, folder, n=s.images, seed=s.seed, masks=s.masks)
    look = O.learn_look(world.concept_images(NAME, s.images, seed=s.seed))
    assert look == O.Look.of(c)
    prompts = WE.concept_prompts([f"{TOKEN} {c.class_word}"], [look])
    texts = [strip_tokens(p, [TOKEN]) for p in prompts]
    class_prompt = f"photo of a {c.class_word}"
    ordinary = WE.ordinary_prompts()

    base = load_pipeline("nano")
    set_scheduler(base, "dpm")
    base_imgs = _all_images(base, texts, class_prompt, ordinary)
    reg = generated_regularisation(base, class_word=c.class_word, count=s.num_reg, seed=0, resolution=64,
                                   fingerprint=fingerprint(base.unet), cache_root=tmp_path / "reg")
    pipe = load_pipeline("nano")
    cfg = TrainConfig(steps=s.steps, batch_size=s.batch_size, lr=s.lr, scale_lr=False, resolution=64, seed=s.seed,
                      precision="fp32", aug=s.aug, background_weight=s.background_weight)
    photos = list_images(folder, with_masks=True)
    assert all(p.mask is not None for p in photos) == s.masks
    delta = train(pipe, [Concept(TOKEN, c.class_word, photos, reg)], cfg).delta
    set_scheduler(pipe, "dpm")
    imgs = _all_images(pipe, prompts, class_prompt, ordinary)

    scores = WE.score(tokens=[TOKEN], looks=[look], prompts=list(zip(prompts, texts)), concept_images=imgs,
                      base_images=base_imgs, class_prompts={TOKEN: class_prompt}, class_concept=imgs,
                      class_base=base_imgs, ordinary_concept={p: imgs[p] for p in ordinary},
                      ordinary_base={p: base_imgs[p] for p in ordinary})
    sc = scores.concepts[0]
    print("\n".join(scores.sentences()))
    assert sc.presence.value >= MIN_PRESENCE
    assert sc.baseline_presence.value <= MAX_BASE_PRESENCE
    assert sc.class_presence.value <= MAX_CLASS_PRESENCE
    assert scores.ordinary_drop <= MAX_ORDINARY_DROP

    # Constrained, the concept keeps most of its presence and gives back the drift on ordinary captions.
    kept = load_pipeline("nano")
    G = regulariser_gram(kept, list(captions_for(resolve_base("nano").ref)), None, "")  # what `cdiff merge` uses
    apply_delta(kept, constrain_delta(kept, delta, [c.class_word], G=G))
    set_scheduler(kept, "dpm")
    kept_imgs = {**_images(kept, prompts), **_images(kept, ordinary, n=1, seed=700)}
    kept_scores = WE.score(tokens=[TOKEN], looks=[look], prompts=list(zip(prompts, texts)), concept_images=kept_imgs,
                           base_images=base_imgs, class_prompts={}, class_concept={}, class_base={},
                           ordinary_concept={p: kept_imgs[p] for p in ordinary},
                           ordinary_base={p: base_imgs[p] for p in ordinary})
    print("constrained:", "\n".join(kept_scores.sentences()))
    assert kept_scores.concepts[0].presence.value >= MIN_CONSTRAINED_PRESENCE
    assert kept_scores.ordinary_drop <= MAX_CONSTRAINED_DROP and kept_scores.ordinary_drop < scores.ordinary_drop
