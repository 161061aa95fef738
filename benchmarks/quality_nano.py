"""The paper's comparison in miniature, offline, on the shipped nano model and its procedural world.

Single concept (each of --concepts): Custom Diffusion (k/v), crossattn mode, full UNet fine-tuning and
the token alone (textual inversion), each with and without generated regularisation images. Scores,
with the nano CLIP: text alignment (CLIPScore, tokens removed), image alignment to the training images,
and forgetting (KID x1000 of class-prompt images against the base, paired seeds).
Two concepts: joint training, the closed-form merge of the two single k/v runs, and the plain sum of
their deltas; image alignment of pair-prompt images to each concept's training images.

    python benchmarks/quality_nano.py [--steps 250] [--concepts heart,zigzag] [--images-per-prompt 4]

Every method gets the same steps and batch; learning rates follow each method's usual practice (per
method, absolute, not scaled): k/v and crossattn 3e-4 (the demo's), full fine-tuning 5e-5 (DreamBooth-like,
lower because every UNet weight moves), token only 5e-3 (textual inversion's). The method's zoom
augmentation is off (as in the demo, see cdiff_cli/demo.py): the world's 64 px scenes already vary the
object's size and position, and shrinking a whole scene onto a blank canvas only adds images unlike any
the nano model knows (measured: it cuts the image-alignment gain of <heart> from +0.21 to +0.08).

Prints tables and writes benchmarks/results/quality_nano.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PROMPTS = ("a small {} on the left", "a big {} at the top", "{} on the right of a blue circle",
           "a small {} on a striped green background")
PAIR_PROMPTS = ("{0} on the left of {1}", "{0} above {1}, on a dotted gray background")
METHODS = (("custom diffusion (kv)", "kv"), ("crossattn", "crossattn"), ("full fine-tuning", "full"),
           ("textual inversion", "token"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4, help="k/v, crossattn and joint training (absolute, not scaled)")
    ap.add_argument("--lr-full", type=float, default=5e-5, help="full UNet fine-tuning")
    ap.add_argument("--precision", default="auto", help="training precision (auto: bf16 where the CPU/GPU has it)")
    ap.add_argument("--aug", action="store_true", help="use the method's zoom augmentation (off: see above)")
    ap.add_argument("--lr-token", type=float, default=5e-3, help="token only (textual inversion)")
    ap.add_argument("--concepts", default="heart,zigzag")
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--class-images", type=int, default=8)
    ap.add_argument("--num-reg", type=int, default=16)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--base", default="nano", help="the shipped nano model, or a folder")
    ap.add_argument("--clip", default="nano", help="the shipped nano CLIP, or a folder")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "quality_nano.json")
    args = ap.parse_args()

    import torch
    from PIL import Image

    from cdiff_cli import metrics as M
    from cdiff_cli import world
    from cdiff_cli.base import load_pipeline, resolve_precision
    from cdiff_cli.captions import load_captions
    from cdiff_cli.data import list_images
    from cdiff_cli.delta import apply_delta
    from cdiff_cli.eval_prompts import strip_tokens
    from cdiff_cli.features import load_clip
    from cdiff_cli.generate import sample, set_scheduler
    from cdiff_cli.layers import fingerprint
    from cdiff_cli.merge import gram, merge_deltas, prompt_features
    from cdiff_cli.regset import generated_regularisation
    from cdiff_cli.train import Concept, TrainConfig, train

    args.precision = resolve_precision(args.precision, torch.device("cpu"))
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="cdiff-quality-"))
    clip = load_clip(args.clip)
    names = args.concepts.split(",")
    concepts = {}
    for i, name in enumerate(names):
        folder = work / "images" / name
        world.save_concept_images(name, folder, n=6, seed=0)
        c = world.CONCEPTS[name]
        concepts[name] = {"token": f"<{name}>", "class": c.class_word, "images": list_images(folder)}
        concepts[name]["train_feats"] = clip.images([Image.open(p.path).convert("RGB") for p in concepts[name]["images"]])

    def fresh():
        pipe = load_pipeline(args.base)
        set_scheduler(pipe, "dpm")
        return pipe

    def gen(pipe, prompts, seed0=0):
        out = []
        for k, p in enumerate(prompts):
            out += sample(pipe, p, n=args.images_per_prompt, steps=args.sample_steps, seed=seed0 + 100 * k)
        return out

    base_pipe = fresh()
    fp = fingerprint(base_pipe.unet)
    reg_sets = {}
    for name, c in concepts.items():
        if c["class"] not in reg_sets:
            reg_sets[c["class"]] = generated_regularisation(base_pipe, class_word=c["class"], count=args.num_reg, seed=0,
                                                            resolution=64, fingerprint=fp, cache_root=work / "reg")
    class_prompts = {c["class"]: [f"a photo of a {c['class']}"] for c in concepts.values()}
    base_class = {cls: clip.images(sample(base_pipe, p[0], n=args.class_images, steps=args.sample_steps, seed=500))
                  for cls, p in class_prompts.items()}

    def phrase(name):
        return f"{concepts[name]['token']} {concepts[name]['class']}"

    def score(pipe, name, tokens):
        prompts = [t.format(phrase(name)) for t in PROMPTS]
        imgs = gen(pipe, prompts)
        feats = clip.images(imgs)
        texts = [strip_tokens(p, tokens) for p in prompts for _ in range(args.images_per_prompt)]
        cls = concepts[name]["class"]
        cls_feats = clip.images(sample(pipe, class_prompts[cls][0], n=args.class_images, steps=args.sample_steps, seed=500))
        return {
            "text_alignment": float(M.clip_score(feats, clip.texts(texts))),
            "image_alignment": float(M.mean_cosine(feats, concepts[name]["train_feats"])),
            "kid_x1000": float(1000 * M.kid(base_class[cls], cls_feats, paired=True)),
        }

    results = {"single": [], "pairs": [], "base": {}}
    # Base model on the same prompts, tokens removed.
    for name in names:
        prompts = [strip_tokens(t.format(phrase(name)), [concepts[name]["token"]]) for t in PROMPTS]
        feats = clip.images(gen(base_pipe, prompts))
        texts = [p for p in prompts for _ in range(args.images_per_prompt)]
        results["base"][name] = {"text_alignment": float(M.clip_score(feats, clip.texts(texts))),
                                 "image_alignment": float(M.mean_cosine(feats, concepts[name]["train_feats"])),
                                 "kid_x1000": 0.0}

    kv_deltas = {}
    for name in names:
        c = concepts[name]
        for label, mode in METHODS:
            for with_reg in (True, False):
                t0 = time.perf_counter()
                pipe = fresh()
                reg = reg_sets[c["class"]] if with_reg else []
                lr = {"full": args.lr_full, "token": args.lr_token}.get(mode, args.lr)
                cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, scale_lr=False, mode=mode,
                                  resolution=64, seed=0, precision=args.precision, aug=args.aug)
                res = train(pipe, [Concept(c["token"], c["class"], c["images"], reg)], cfg)
                row = {"concept": name, "method": label, "mode": mode, "regularisation": with_reg, "lr": lr,
                       **score(pipe, name, [c["token"]]), "train_s": round(time.perf_counter() - t0, 1)}
                results["single"].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if mode == "kv" and with_reg:
                    kv_deltas[name] = res.delta

    # Two concepts: joint, merge, sum.
    if len(names) >= 2:
        a, b = names[:2]
        ca, cb = concepts[a], concepts[b]
        pair_prompts = [t.format(phrase(a), phrase(b)) for t in PAIR_PROMPTS]
        toks = [ca["token"], cb["token"]]

        def pair_scores(pipe, label):
            imgs = gen(pipe, pair_prompts)
            feats = clip.images(imgs)
            texts = [strip_tokens(p, toks) for p in pair_prompts for _ in range(args.images_per_prompt)]
            row = {"method": label, "text_alignment": float(M.clip_score(feats, clip.texts(texts))),
                   "image_alignment_" + a: float(M.mean_cosine(feats, ca["train_feats"])),
                   "image_alignment_" + b: float(M.mean_cosine(feats, cb["train_feats"]))}
            results["pairs"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

        pair_scores(base_pipe, "base (tokens removed: untrained tokens)")  # tokens unknown: a lower bound
        pipe = fresh()
        cfg = TrainConfig(steps=2 * args.steps, batch_size=args.batch_size, lr=args.lr, scale_lr=False, resolution=64, seed=0,
                          precision=args.precision, aug=args.aug)
        train(pipe, [Concept(ca["token"], ca["class"], ca["images"], reg_sets[ca["class"]]),
                     Concept(cb["token"], cb["class"], cb["images"], reg_sets[cb["class"]])], cfg)
        pair_scores(pipe, "joint training")
        pipe = fresh()
        G = gram(prompt_features(pipe, list(load_captions())))
        merged, _ = merge_deltas(pipe, [kv_deltas[a], kv_deltas[b]], [[ca["class"]], [cb["class"]]], G=G)
        pipe = fresh()
        apply_delta(pipe, merged)
        pair_scores(pipe, "closed-form merge")
        pipe = fresh()
        W0 = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if n in kv_deltas[a].weights}
        summed = merged.__class__({n: W0[n] + (kv_deltas[a].weights[n] - W0[n]) + (kv_deltas[b].weights[n] - W0[n]) for n in W0},
                                  merged.tokens, merged.embeddings, "kv")
        apply_delta(pipe, summed)
        pair_scores(pipe, "sum of deltas")

    # Tables (Markdown, ready for the README).
    print(f"\nSingle concept: nano, {args.steps} steps, batch {args.batch_size}; scores with the nano CLIP "
          f"({args.images_per_prompt} images x {len(PROMPTS)} prompts; KID on {args.class_images} class-prompt images)\n")
    print("| concept | method | reg | text alignment | image alignment | KID x1000 vs base |")
    print("|---|---|---|---:|---:|---:|")
    for name in names:
        b = results["base"][name]
        print(f"| {name} | base model (token removed) | | {b['text_alignment']:.3f} | {b['image_alignment']:.3f} | 0 |")
        for r in results["single"]:
            if r["concept"] == name:
                print(f"| {name} | {r['method']} | {'yes' if r['regularisation'] else 'no'} | {r['text_alignment']:.3f} "
                      f"| {r['image_alignment']:.3f} | {r['kid_x1000']:.1f} |")
    if results["pairs"]:
        a, b = names[:2]
        print(f"\nTwo concepts ({a} + {b}), pair prompts\n")
        print(f"| method | text alignment | image alignment to {a} | image alignment to {b} |")
        print("|---|---:|---:|---:|")
        for r in results["pairs"]:
            print(f"| {r['method']} | {r['text_alignment']:.3f} | {r['image_alignment_' + a]:.3f} | {r['image_alignment_' + b]:.3f} |")
    meta = {"machine": platform.platform(), "torch": torch.__version__, "steps": args.steps, "batch_size": args.batch_size,
            "lr": args.lr, "lr_full": args.lr_full, "aug": args.aug, "precision": args.precision, "lr_token": args.lr_token, "images_per_prompt": args.images_per_prompt, "class_images": args.class_images,
            "sample_steps": args.sample_steps, "num_reg": args.num_reg, "prompts": PROMPTS, "pair_prompts": PAIR_PROMPTS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, **results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
