"""The paper's comparison in miniature, offline, on the shipped nano model: oracle and CLIP scores, several
seeds, 95 % intervals.

Single concept (each of --concepts): Custom Diffusion (k/v), crossattn mode, full UNet fine-tuning and the
token alone (textual inversion), each with and without generated regularisation images. Scores per run:
- presence: share of images of prompts that place the concept in new contexts (world_eval.SINGLE_TEMPLATES)
  in which the oracle reads the concept's look (kind, colour, fill);
- others: share of those images with every other attribute of the prompt right;
- drift: share of "photo of a CLASS" images showing the concept, and the drop (points) in objects drawn
  right on ordinary world captions, against the base with the same seeds;
- CLIP (nano): image alignment to the training images, text alignment (CLIPScore, token removed).
Two concepts (the first --pairs): joint training, the closed-form merge of the two single k/v runs, and the
plain sum of their deltas: share of pair-prompt images showing each concept and both.

Each configuration runs once per seed (--seeds; the seed sets training and sampling); the tables give the
mean over seeds with a 95 % t-interval across seeds, and the findings compare intervals.

    python benchmarks/quality_nano.py [--seeds 0,1,2] [--steps 600] [--concepts pinksquare,browncircle]

Every method gets the same steps and batch; learning rates follow each method's usual practice (absolute):
k/v and crossattn 6e-4 (the demo's), full fine-tuning 5e-5, token only 5e-3. The zoom augmentation is
off, as in the demo. Prints Markdown tables and writes benchmarks/results/quality_nano.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

METHODS = (("custom diffusion (kv)", "kv"), ("crossattn", "crossattn"), ("full fine-tuning", "full"),
           ("textual inversion", "token"))
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval across seeds (0 for one seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, _T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def fmt(values: list[float], pct: bool = True) -> str:
    m, h = interval(values)
    if len(values) < 2:  # one seed: a value, no interval
        return f"{100 * m:.0f}" if pct else f"{m:.3f}"
    return f"{100 * m:.0f} ± {100 * h:.0f}" if pct else f"{m:.3f} ± {h:.3f}"


def parse_args(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=600, help="per concept (the demo's); joint training gets twice")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=6e-4, help="k/v, crossattn and joint training (absolute, not scaled)")
    ap.add_argument("--lr-full", type=float, default=5e-5, help="full UNet fine-tuning")
    ap.add_argument("--lr-token", type=float, default=5e-3, help="token only (textual inversion)")
    ap.add_argument("--precision", default="auto", help="training precision (auto: bf16 where the CPU has it)")
    ap.add_argument("--concepts", default="pinksquare,browncircle", help="the first two also make the pair")
    ap.add_argument("--methods", default="kv,crossattn,full,token")
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--class-images", type=int, default=8)
    ap.add_argument("--ordinary-images", type=int, default=1, help="images per ordinary caption (12 captions)")
    ap.add_argument("--num-reg", type=int, default=64, help="generated regularisation images per class (the demo's)")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0, help="sampling guidance scale (the demo's)")
    ap.add_argument("--base", default="nano", help="the shipped nano model, or a folder")
    ap.add_argument("--clip", default="nano", help="the shipped nano CLIP, or a folder")
    ap.add_argument("--reg", choices=("both", "yes", "no"), default="both", help="runs with regularisation, without, or both")
    ap.add_argument("--constrained", action="store_true",
                    help="also score each k/v delta (with regularisation) projected by the closed form onto the base's "
                         "outputs on ordinary captions (merging.constrain_delta): no extra training")
    ap.add_argument("--anchor", type=float, default=0.0,
                    help="the anchor on ordinary text for every trained run (cdiff train --anchor, training.anchor; "
                         "0: off, the paper's method)")
    ap.add_argument("--prior-weight", type=float, default=1.0,
                    help="weight of the regularisation images' loss (TrainConfig.prior_weight; the paper's 1)")
    from cdiff_cli.world.demo import DemoSettings

    ap.add_argument("--photos", type=int, default=DemoSettings.images, help="training photos per concept (the demo's)")
    ap.add_argument("--masks", action="store_true",
                    help="write each concept photo's object mask beside it (NAME.mask.png), which training then reads")
    from cdiff_cli.defaults import TRAIN

    ap.add_argument("--background-weight", type=float, default=TRAIN.background_weight,
                    help="loss weight of a masked photo's background (cdiff train --background-weight)")
    ap.add_argument("--no-pairs", dest="pairs", action="store_false", help="single concepts only")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "quality_nano.json")
    return ap.parse_args(argv)


class Bench:
    """Shared state: the base, its images, the concepts' photos and regularisation sets."""

    def __init__(self, args, base_images: bool = True):
        import torch
        from PIL import Image

        from cdiff_cli import world
        from cdiff_cli.core.layers import fingerprint
        from cdiff_cli.evaluation.features import load_clip
        from cdiff_cli.models.base import resolve_precision
        from cdiff_cli.training.images import list_images
        from cdiff_cli.training.regularisation import generated_regularisation
        from cdiff_cli.world import oracle as O
        from cdiff_cli.world import scores as WE

        self.args = args
        args.precision = resolve_precision(args.precision, torch.device("cpu"))
        self.work = Path(tempfile.mkdtemp(prefix="cdiff-quality-"))
        self.clip = load_clip(args.clip)
        self.ordinary = WE.ordinary_prompts()
        self.concepts = {}
        for name in args.concepts.split(","):
            folder = self.work / "images" / name
            world.save_concept_images(name, folder, n=args.photos, seed=0, masks=args.masks)
            c = world.CONCEPTS[name]
            images = list_images(folder, with_masks=True)
            pils = [Image.open(p.path).convert("RGB") for p in images]
            self.concepts[name] = {"token": f"<{name}>", "class": c.class_word, "images": images,
                                   "look": O.Look.of(c), "train_feats": self.clip.images(pils)}
        base = self.fresh()
        fp = fingerprint(base.unet)
        self.reg = {c["class"]: generated_regularisation(base, class_word=c["class"], count=args.num_reg, seed=0,
                                                         resolution=64, fingerprint=fp, cache_root=self.work / "reg")
                    for c in self.concepts.values()}
        self.base_images = {s: self.images(base, s) for s in self.seeds} if base_images else {}
        self._G = None

    def gram(self):
        """The ordinary captions' Gram matrix (the closed form's), computed once."""
        from cdiff_cli.merging import regulariser_gram
        from cdiff_cli.merging.captions import captions_for
        from cdiff_cli.models.base import resolve_base

        if self._G is None:  # as `cdiff merge` computes it, without its cache
            self._G = regulariser_gram(self.fresh(), list(captions_for(resolve_base(self.args.base).ref)), None, "")
        return self._G

    def anchor_gram(self, classes: list[str]):
        """The anchor's Gram matrix (`training.anchor.anchor_gram`: `gram()` with the class prompts pinned), or None
        when the runs have no anchor."""
        from cdiff_cli.training.anchor import pin_class_prompts

        return pin_class_prompts(self.fresh(), self.gram(), classes) if self.args.anchor else None

    @property
    def seeds(self) -> list[int]:
        return [int(s) for s in self.args.seeds.split(",")]

    def fresh(self):
        from cdiff_cli.generation import set_scheduler
        from cdiff_cli.models.base import load_pipeline

        pipe = load_pipeline(self.args.base)
        set_scheduler(pipe, "dpm")
        return pipe

    def prompts(self, name: str) -> list[tuple[str, str]]:
        from cdiff_cli.evaluation.prompts import strip_tokens
        from cdiff_cli.world import scores as WE

        c = self.concepts[name]
        texts = WE.concept_prompts([f"{c['token']} {c['class']}"], [c["look"]])
        return [(p, strip_tokens(p, [c["token"]])) for p in texts]

    def pair_prompts(self, a: str, b: str) -> list[tuple[str, str]]:
        from cdiff_cli.evaluation.prompts import strip_tokens
        from cdiff_cli.world import scores as WE

        ca, cb = self.concepts[a], self.concepts[b]
        texts = WE.concept_prompts([f"{ca['token']} {ca['class']}", f"{cb['token']} {cb['class']}"], [ca["look"], cb["look"]])
        return [(p, strip_tokens(p, [ca["token"], cb["token"]])) for p in texts]

    def gen(self, pipe, prompt: str, n: int, seed: int):
        from cdiff_cli.generation import sample

        return sample(pipe, prompt, n=n, steps=self.args.sample_steps, guidance=self.args.guidance, seed=seed)

    def images(self, pipe, seed: int, tokens: bool = False, names: list[str] | None = None) -> dict:
        """The images a run is scored on: the prompts of the concepts `names` (default all; with tokens when
        `tokens`, else without), their class prompts and the ordinary captions (one image each)."""
        k, n = self.args.class_images, self.args.images_per_prompt
        out = {}
        for name in names or list(self.concepts):
            c = self.concepts[name]
            for i, (p, text) in enumerate(self.prompts(name)):
                q = p if tokens else text
                out[q] = self.gen(pipe, q, n, 1000 * seed + 10 * i)
            cp = f"photo of a {c['class']}"
            out[cp] = self.gen(pipe, cp, k, 1000 * seed + 500)
        for i, p in enumerate(self.ordinary):
            out[p] = self.gen(pipe, p, self.args.ordinary_images, 1000 * seed + 700 + 10 * i)
        return out


def score_single(b: Bench, name: str, seed: int, imgs: dict) -> dict:
    from cdiff_cli.evaluation import metrics as M
    from cdiff_cli.world import scores as WE

    c = b.concepts[name]
    base = b.base_images[seed]
    prompts = b.prompts(name)
    cp = f"photo of a {c['class']}"
    ws = WE.score(tokens=[c["token"]], looks=[c["look"]], prompts=prompts,
                  concept_images={p: imgs[p] for p, _ in prompts}, base_images={t: base[t] for _, t in prompts},
                  class_prompts={c["token"]: cp}, class_concept={cp: imgs[cp]}, class_base={cp: base[cp]},
                  ordinary_concept={p: imgs[p] for p in b.ordinary}, ordinary_base={p: base[p] for p in b.ordinary})
    sc = ws.concepts[0]
    flat = [im for p, _ in prompts for im in imgs[p]]
    feats = b.clip.images(flat)
    texts = [t for _, t in prompts for _ in imgs[prompts[0][0]]]
    from cdiff_cli.world import oracle as O

    def tinted(images):
        return sum(WE._has_colour(O.read(im), c["look"]) for im in images) / len(images)

    return {"presence": sc.presence.value, "baseline_presence": sc.baseline_presence.value,
            "colour_presence": sc.colour_presence.value, "baseline_colour_presence": sc.baseline_colour_presence.value,
            "class_colour": tinted(imgs[cp]), "baseline_class_colour": tinted(base[cp]),
            "others": ws.others.value, "class_presence": sc.class_presence.value,
            "baseline_class_presence": sc.baseline_class_presence.value,
            "ordinary_drop_points": ws.ordinary_drop, "ordinary_object": ws.ordinary.get("object"),
            "image_alignment": float(M.mean_cosine(feats, c["train_feats"])),
            "text_alignment": float(M.clip_score(feats, b.clip.texts(texts)))}


def run_single(b: Bench, results: dict) -> dict:
    """Every method x regularisation x concept x seed; returns the k/v deltas (with regularisation) per
    (concept, seed) for the merge."""
    from cdiff_cli.training import Concept, TrainConfig, train

    a = b.args
    kv = {}
    methods = [m for m in METHODS if m[1] in a.methods.split(",")]
    for name, c in b.concepts.items():
        for label, mode in methods:
            for with_reg in {"both": (True, False), "yes": (True,), "no": (False,)}[a.reg]:
                for seed in b.seeds:
                    t0 = time.perf_counter()
                    pipe = b.fresh()
                    lr = {"full": a.lr_full, "token": a.lr_token}.get(mode, a.lr)
                    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=lr, scale_lr=False, mode=mode,
                                      resolution=64, seed=seed, precision=a.precision, aug=False, anchor=a.anchor,
                                      prior_weight=a.prior_weight, background_weight=a.background_weight)
                    res = train(pipe, [Concept(c["token"], c["class"], c["images"], b.reg[c["class"]] if with_reg else [])], cfg,
                                anchor_gram=b.anchor_gram([c["class"]]))
                    row = {"concept": name, "method": label, "mode": mode, "regularisation": with_reg, "seed": seed,
                           "lr": lr, **score_single(b, name, seed, b.images(pipe, seed, tokens=True, names=[name])),
                           "seconds": round(time.perf_counter() - t0, 1)}
                    results["single"].append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    if mode == "kv" and with_reg:
                        kv[(name, seed)] = res.delta
                        if a.constrained:
                            results["single"].append(constrained_row(b, name, seed, res.delta, lr))
    return kv


def constrained_row(b: Bench, name: str, seed: int, delta, lr: float) -> dict:
    """The k/v delta of a run with regularisation, projected by the closed form (merging.constrain_delta)."""
    from cdiff_cli.core.delta import apply_delta
    from cdiff_cli.merging import constrain_delta

    t0 = time.perf_counter()
    pipe = b.fresh()
    c = b.concepts[name]
    apply_delta(pipe, constrain_delta(pipe, delta, [c["class"]], G=b.gram()))
    row = {"concept": name, "method": "custom diffusion (kv), constrained", "mode": "kv", "regularisation": True,
           "seed": seed, "lr": lr, **score_single(b, name, seed, b.images(pipe, seed, tokens=True, names=[name])),
           "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def pair_row(b: Bench, pipe, a: str, c2: str, seed: int, label: str, *, tokens: bool = True) -> dict:
    from cdiff_cli.world import oracle as O

    both, each, tints = [], {a: [], c2: []}, []
    for i, (p, text) in enumerate(b.pair_prompts(a, c2)):
        for im in b.gen(pipe, p if tokens else text, b.args.images_per_prompt, 1000 * seed + 10 * i):
            r = O.read(im)
            seen = {x: O.concept_present(r, b.concepts[x]["look"]) for x in (a, c2)}
            both.append(all(seen.values()))
            for x in (a, c2):
                each[x].append(seen[x])
            tints.append(all(any(o.colour == b.concepts[x]["look"].colour for o in r.objects) for x in (a, c2)))
    row = {"method": label, "seed": seed, "both": sum(both) / len(both), "both_colours": sum(tints) / len(tints),
           **{f"presence_{x}": sum(v) / len(v) for x, v in each.items()}}
    if tokens and seed in b.base_images:  # steps_nano.py scores the pairs without base images
        row["ordinary_drop_points"] = ordinary_drop(b, pipe, seed)
    return row


def ordinary_drop(b: Bench, pipe, seed: int) -> float:
    """Points of prompt following (objects right) lost on the ordinary captions against the base, same seeds."""
    from cdiff_cli.world import scores as WE

    base = b.base_images[seed]
    now = {p: b.gen(pipe, p, b.args.ordinary_images, 1000 * seed + 700 + 10 * i) for i, p in enumerate(b.ordinary)}
    return 100 * (WE.ordinary_following({p: base[p] for p in b.ordinary})["object"] - WE.ordinary_following(now)["object"])


def run_pairs(b: Bench, kv: dict, results: dict) -> None:
    from cdiff_cli.core.delta import apply_delta
    from cdiff_cli.merging import merge_deltas
    from cdiff_cli.training import Concept, TrainConfig, train

    names = list(b.concepts)
    if len(names) < 2 or not kv:
        return
    a, c2 = names[:2]
    ca, cb = b.concepts[a], b.concepts[c2]
    G = b.gram()
    for seed in b.seeds:
        rows = [pair_row(b, b.fresh(), a, c2, seed, "base (tokens removed)", tokens=False)]
        pipe = b.fresh()
        cfg = TrainConfig(steps=2 * b.args.steps, batch_size=b.args.batch_size, lr=b.args.lr, scale_lr=False,
                          resolution=64, seed=seed, precision=b.args.precision, aug=False, anchor=b.args.anchor,
                          prior_weight=b.args.prior_weight, background_weight=b.args.background_weight)
        train(pipe, [Concept(ca["token"], ca["class"], ca["images"], b.reg[ca["class"]]),
                     Concept(cb["token"], cb["class"], cb["images"], b.reg[cb["class"]])], cfg,
              anchor_gram=b.anchor_gram([ca["class"], cb["class"]]))
        rows.append(pair_row(b, pipe, a, c2, seed, "joint training"))
        pipe = b.fresh()
        da, db = kv[(a, seed)], kv[(c2, seed)]
        merged, _ = merge_deltas(pipe, [da, db], [[ca["class"]], [cb["class"]]], G=G)
        apply_delta(pipe, merged)
        rows.append(pair_row(b, pipe, a, c2, seed, "closed-form merge"))
        pipe = b.fresh()
        W0 = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if n in da.weights}
        summed = merged.__class__({n: W0[n] + (da.weights[n] - W0[n]) + (db.weights[n] - W0[n]) for n in W0},
                                  merged.tokens, merged.embeddings, "kv")
        apply_delta(pipe, summed)
        rows.append(pair_row(b, pipe, a, c2, seed, "sum of deltas"))
        for row in rows:
            results["pairs"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)


def _group(rows, *keys):
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def tables(results: dict, args) -> list[str]:
    lines = [f"Single concept: nano, {args.steps} steps, batch {args.batch_size}, seeds {args.seeds}; mean ± 95 % "
             f"interval across seeds; {args.images_per_prompt} images x 10 prompts, {args.class_images} class-prompt images, "
             f"12 ordinary captions x {args.ordinary_images} image(s)", "",
             "| concept | method | reg | presence % | colour % | others % | class prompt: concept % | class prompt: colour % "
             "| ordinary captions: drop (points) | image alignment | text alignment |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (name,), rows in _group(results["single"], "concept").items():
        first = _group(rows, "method", "regularisation")
        base = next(iter(first.values()))
        lines.append(f"| {name} | base model (token removed) | | {fmt([r['baseline_presence'] for r in base])} "
                     f"| {fmt([r['baseline_colour_presence'] for r in base])} | | "
                     f"{fmt([r['baseline_class_presence'] for r in base])} | {fmt([r['baseline_class_colour'] for r in base])} "
                     "| 0 | | |")
        for (method, reg), rs in first.items():
            lines.append(f"| {name} | {method} | {'yes' if reg else 'no'} | {fmt([r['presence'] for r in rs])} "
                         f"| {fmt([r['colour_presence'] for r in rs])} "
                         f"| {fmt([r['others'] for r in rs])} | {fmt([r['class_presence'] for r in rs])} "
                         f"| {fmt([r['class_colour'] for r in rs])} "
                         f"| {fmt([r['ordinary_drop_points'] / 100 for r in rs])} "
                         f"| {fmt([r['image_alignment'] for r in rs], pct=False)} | {fmt([r['text_alignment'] for r in rs], pct=False)} |")
    if results["pairs"]:
        a, c2 = args.concepts.split(",")[:2]
        lines += ["", f"Two concepts ({a} + {c2}), 6 pair prompts x {args.images_per_prompt} images, seeds {args.seeds}", "",
                  f"| method | both present % | both colours % | {a} present % | {c2} present % "
                  "| ordinary captions: drop (points) |", "|---|---:|---:|---:|---:|---:|"]
        for (method,), rs in _group(results["pairs"], "method").items():
            drops = [r["ordinary_drop_points"] / 100 for r in rs if r.get("ordinary_drop_points") is not None]
            lines.append(f"| {method} | {fmt([r['both'] for r in rs])} | {fmt([r['both_colours'] for r in rs])} "
                         f"| {fmt([r['presence_' + a] for r in rs])} "
                         f"| {fmt([r['presence_' + c2] for r in rs])} | {fmt(drops) if drops else ''} |")
    return lines


def _stat(rows, key):
    return interval([r[key] for r in rows])


def findings(results: dict) -> list[str]:
    """The paper's claims, checked on the intervals: 'reproduced' only when the intervals do not overlap
    in the paper's direction, 'not reproduced' when they do in the other, else 'not resolved'."""
    one_seed = len({r["seed"] for r in results["single"] + results["pairs"]}) < 2

    def verdict(better: tuple[float, float], worse: tuple[float, float]) -> str:
        if one_seed:  # no interval: say only which way it went
            if better[0] == worse[0]:
                return "no difference (one seed: no interval)"
            return "in the paper's direction (one seed: no interval)" if better[0] > worse[0] else \
                "not in the paper's direction (one seed: no interval)"
        if better[0] - better[1] > worse[0] + worse[1]:
            return "reproduced"
        if worse[0] - worse[1] > better[0] + better[1]:
            return "not reproduced (the opposite holds)"
        return "not resolved at these seeds (intervals overlap)"

    out = []
    by = _group(results["single"], "concept", "mode", "regularisation")
    for name in dict.fromkeys(r["concept"] for r in results["single"]):
        kv_reg, kv_noreg = by.get((name, "kv", True)), by.get((name, "kv", False))
        if kv_reg and kv_noreg:
            a, b = _stat(kv_reg, "class_presence"), _stat(kv_noreg, "class_presence")
            out.append(f"{name}: regularisation limits drift (class prompts yield the concept less often with it: "
                       f"{100 * a[0]:.0f} ± {100 * a[1]:.0f} % against {100 * b[0]:.0f} ± {100 * b[1]:.0f} %): "
                       f"{verdict((-a[0], a[1]), (-b[0], b[1]))}")
        if kv_reg and kv_noreg:
            a, b = _stat(kv_reg, "class_colour"), _stat(kv_noreg, "class_colour")
            out.append(f"{name}: regularisation limits drift, read by colour (class prompts give the concept's colour: "
                       f"{100 * a[0]:.0f} ± {100 * a[1]:.0f} % with it, {100 * b[0]:.0f} ± {100 * b[1]:.0f} % without): "
                       f"{verdict((-a[0], a[1]), (-b[0], b[1]))}")
        full = by.get((name, "full", True))
        if kv_reg and full:
            a, b = _stat(kv_reg, "ordinary_drop_points"), _stat(full, "ordinary_drop_points")
            pa, pb = _stat(kv_reg, "presence"), _stat(full, "presence")
            out.append(f"{name}: k/v forgets less than full fine-tuning (drop on ordinary captions {a[0]:.0f} ± {a[1]:.0f} "
                       f"against {b[0]:.0f} ± {b[1]:.0f} points; presence {100 * pa[0]:.0f} against {100 * pb[0]:.0f} %): "
                       f"{verdict((-a[0], a[1]), (-b[0], b[1]))}")
    pairs = _group(results["pairs"], "method")
    if pairs:
        m, j, s = (_stat(pairs[(k,)], "both") if pairs.get((k,)) else None
                   for k in ("closed-form merge", "joint training", "sum of deltas"))
        if m and s:
            out.append(f"the merge shows both concepts more often than the sum of deltas ({100 * m[0]:.0f} ± {100 * m[1]:.0f} "
                       f"against {100 * s[0]:.0f} ± {100 * s[1]:.0f} % of pair images): {verdict(m, s)}")
        if m and j:
            close = abs(m[0] - j[0]) <= m[1] + j[1]
            said = "one seed: no interval" if one_seed else \
                "reproduced (intervals overlap)" if close else "not reproduced"
            out.append(f"the merge is close to joint training, both concepts present ({100 * m[0]:.0f} ± {100 * m[1]:.0f} "
                       f"against {100 * j[0]:.0f} ± {100 * j[1]:.0f} %): {said}")
        md, sd = ([r for r in pairs.get((k,), []) if r.get("ordinary_drop_points") is not None]
                  for k in ("closed-form merge", "sum of deltas"))
        if md and sd:
            md, sd = _stat(md, "ordinary_drop_points"), _stat(sd, "ordinary_drop_points")  # the merge's objective: ordinary captions kept near the base
            out.append(f"the merge drifts less on ordinary captions than the sum of deltas (drop {md[0]:.0f} ± {md[1]:.0f} "
                       f"against {sd[0]:.0f} ± {sd[1]:.0f} points): {verdict((-md[0], md[1]), (-sd[0], sd[1]))}")
    return out


def main():
    import torch

    args = parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    b = Bench(args)
    results = {"single": [], "pairs": []}
    kv = run_single(b, results)
    if args.pairs:
        run_pairs(b, kv, results)
    lines = tables(results, args) + ["", "Findings (the paper's results, checked on 95 % intervals across seeds):", ""]
    lines += [f"- {f}" for f in findings(results)]
    print("\n".join(lines))
    meta = {"machine": platform.platform(), "torch": torch.__version__, **{k: str(v) for k, v in vars(args).items()},
            "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, **results, "findings": findings(results)}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
