"""The method works on the shipped nano model, as the oracle reads the pictures: one concept trained with the
demo's settings brings its colour where prompts place it in new contexts, while the plain class prompt
seldom turns into the concept and ordinary captions are drawn about as before (drift). The concept's
whole look (a star in exactly the concept's teal) is reported, not asserted: the learned teal comes out
darker and greener than the photos', so the oracle reads it as teal in a few images only (see
docs/nano-world.md).

Thresholds sit below the values measured on the shipped model (in the comments), so that a change that
breaks learning or regularisation fails while seed-level noise does not. The full picture, over several
seeds and methods, is benchmarks/quality_nano.py."""

import torch

from cdiff_cli import oracle as O
from cdiff_cli import world
from cdiff_cli import world_eval as WE
from cdiff_cli.base import load_pipeline
from cdiff_cli.data import list_images
from cdiff_cli.demo import DemoSettings
from cdiff_cli.eval_prompts import strip_tokens
from cdiff_cli.generation import sample, set_scheduler
from cdiff_cli.layers import fingerprint
from cdiff_cli.regset import generated_regularisation
from cdiff_cli.training import Concept, TrainConfig, train

NAME, TOKEN = "tealstar", "<tealstar>"
# Measured on the shipped model (retrained 2026-12-04, seed 0, 20 images of 10 new-context prompts): the
# concept's colour on an object in 8 of 20 (base 1 of 20); its whole look (a teal star) in 2 of 20; the class
# prompt kept (0 of 8 teal stars); objects on ordinary captions right in 67 % against the base's 83 % (a drop
# of 17 points, on 24 images). The colour count moves by several images between runs of the demo (10 of 20
# in `cdiff demo`, whose prompts share these templates): the threshold leaves room for that.
MIN_COLOUR = 0.25  # share of images of new-context prompts with an object in the concept's colour
MAX_BASE_COLOUR = 0.2  # the base, same prompts without the token
MAX_CLASS_PRESENCE = 0.25  # "photo of a star" gives the concept
MAX_CLASS_COLOUR = 0.3  # "photo of a star" gives the concept's colour
MAX_ORDINARY_DROP = 30  # points lost on ordinary world captions (24 images: one image is 4 points)


def _images(pipe, prompts, n=2, seed=0):
    return {p: sample(pipe, p, n=n, steps=20, seed=seed + 10 * i) for i, p in enumerate(prompts)}


def _all_images(pipe, prompts, class_prompt, ordinary):
    """The new-context prompts (2 images each), the class prompt (8) and the ordinary captions (1 each)."""
    return {**_images(pipe, prompts), **_images(pipe, [class_prompt], n=8, seed=500), **_images(pipe, ordinary, n=1, seed=700)}


def test_one_concept_is_learned_and_its_class_kept(tmp_path):
    torch.manual_seed(0)
    s = DemoSettings()
    c = world.CONCEPTS[NAME]
    folder = tmp_path / NAME
    world.save_concept_images(NAME, folder, n=s.images, seed=s.seed)
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
                      precision="fp32", aug=s.aug)
    train(pipe, [Concept(TOKEN, c.class_word, list_images(folder), reg)], cfg)
    set_scheduler(pipe, "dpm")
    imgs = _all_images(pipe, prompts, class_prompt, ordinary)

    scores = WE.score(tokens=[TOKEN], looks=[look], prompts=list(zip(prompts, texts)), concept_images=imgs,
                      base_images=base_imgs, class_prompts={TOKEN: class_prompt}, class_concept=imgs,
                      class_base=base_imgs, ordinary_concept={p: imgs[p] for p in ordinary},
                      ordinary_base={p: base_imgs[p] for p in ordinary})
    sc = scores.concepts[0]
    print("\n".join(scores.sentences()))
    class_colour = sum(any(o.colour == look.colour for o in O.read(im).objects) for im in imgs[class_prompt])
    assert sc.colour_presence.value >= MIN_COLOUR
    assert sc.baseline_colour_presence.value <= MAX_BASE_COLOUR
    assert sc.class_presence.value <= MAX_CLASS_PRESENCE
    assert class_colour / len(imgs[class_prompt]) <= MAX_CLASS_COLOUR
    assert scores.ordinary_drop <= MAX_ORDINARY_DROP
