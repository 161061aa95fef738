"""How well the nano base binds colours and fills to two objects in one picture, by how many are patterned.

    python scripts/probe_binding.py [--n 4] [--guidance 3]

Prompts of two objects with named colours: both solid, one striped or dotted, both patterned. The oracle
reads each sample; a sample counts when both objects are right (kind, colour, fill, size). This is why
the demo pairs a patterned concept with a solid one (docs/nano-world.md)."""

from __future__ import annotations

import argparse
import json

PROBES = {
    "both solid": ["a red square on the left of a yellow heart, on a gray background",
                   "a blue square above a yellow heart, on a white background"],
    "one patterned": ["a red striped square on the left of a yellow circle, on a gray background",
                      "a blue striped square above a red circle, on a white background",
                      "a yellow circle on the left of a red striped square, on a blue background",
                      "a green striped square below a white circle, on a gray background",
                      "a yellow dotted heart on the left of a red circle, on a gray background",
                      "a red dotted heart above a blue circle, on a white background"],
    "both patterned": ["a red striped square on the left of a yellow dotted heart, on a gray background",
                       "a blue striped square above a yellow dotted heart, on a white background",
                       "a yellow dotted heart on the left of a red striped square, on a blue background",
                       "a green striped square below a red dotted heart, on a gray background"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    from cdiff_cli.generation import sample, set_scheduler
    from cdiff_cli.models.base import load_pipeline
    from cdiff_cli.world import oracle as O

    pipe = load_pipeline("nano")
    set_scheduler(pipe, "dpm")
    out, i = {}, 0
    for group, prompts in PROBES.items():
        right = total = 0
        for p in prompts:
            want = O.parse_prompt(p)
            for im in sample(pipe, p, n=args.n, steps=args.steps, guidance=args.guidance, seed=10 * i):
                right += bool(O.score_sample(O.read(im), want)["object"])
                total += 1
            i += 1
        out[group] = {"both right": right, "samples": total}
        print(f"{group:15s} both objects right in {right} of {total}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
