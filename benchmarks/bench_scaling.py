"""How each command's cost grows with its work, on the full-size SD 1.x layout (random weights).

- merge: `merge_entries` of 2, 5, 10 and 20 registry concepts (the whole command's work: base load, the
  regulariser's Gram matrix from the cache, the solve, writing the entry), and the solve alone
  (`merge_deltas`), which is what grows with the number of concepts;
- gen: `generate` with 1, 2 and 4 concepts in the prompt, first call (the concepts merged on the fly and
  cached) and second call (the cached merge), at a few steps and small size: the concept handling, not
  the sampling, is what is measured;
- registry: `cdiff list` (a fresh process, as a user runs it) and prompt token resolution with 10, 100 and
  1,000 entries.

    python benchmarks/bench_scaling.py [--entries 10,100,1000] [--merge 2,5,10,20] [--gen 1,2,4]

Prints a table and writes JSON (default benchmarks/results/bench_scaling-cpu.json). Uses the random
full-size SD 1.x model that bench_train.py and bench_gen.py save (built here if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_gen import synthetic_delta  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cdiff-bench-sd15")
    ap.add_argument("--merge", type=_ints, default=[2, 5, 10, 20], help="concept counts to merge")
    ap.add_argument("--gen", type=_ints, default=[1, 2, 4], help="concept counts in one prompt")
    ap.add_argument("--entries", type=_ints, default=[10, 100, 1000], help="registry sizes for list / resolution")
    ap.add_argument("--gen-steps", type=int, default=2)
    ap.add_argument("--gen-size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_scaling-cpu.json")
    return ap.parse_args()


def _timed(fn, *args, **kwargs):
    """(seconds, result) of fn(*args, **kwargs)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def _registry_of(base_pipe, ref: str, n: int, home: Path):
    """A registry holding n trained-looking concepts of the base (full k/v deltas)."""
    from cdiff_cli.registry import Registry, base_record

    reg = Registry(home)
    rec = base_record(ref, base_pipe.unet)
    for i in range(n):
        reg.create(f"c{i}", synthetic_delta(base_pipe, f"<c{i}>", i), {"kind": "trained", "classes": ["thing"], "base": rec})
    return reg


def bench_merge(args, pipe, ref: str) -> list[dict]:
    from cdiff_cli.merging import gram, merge_deltas, prompt_features
    from cdiff_cli.merging.captions import load_captions
    from cdiff_cli.merging.entries import merge_entries

    rows = []
    G = gram(prompt_features(pipe, list(load_captions())))
    with tempfile.TemporaryDirectory() as tmp:
        reg = _registry_of(pipe, ref, max(args.merge), Path(tmp))
        merge_entries(reg, ["c0", "c1"], "warm", force=True)  # builds and caches the Gram matrix once
        for n in args.merge:
            names = [f"c{i}" for i in range(n)]
            total, _ = _timed(merge_entries, reg, names, f"m{n}", force=True)
            deltas = [reg.get(x).load_delta() for x in names]
            solve, _ = _timed(merge_deltas, pipe, deltas, [["thing"]] * n, G=G)
            rows.append({"concepts": n, "merge_s": round(total, 2), "solve_s": round(solve, 3)})
            print(f"merge {n:3d} concepts: command {total:6.2f} s, solve {solve:6.3f} s", flush=True)
    return rows


def bench_gen(args, pipe, ref: str) -> list[dict]:
    import cdiff_cli as cdiff

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reg = _registry_of(pipe, ref, max(args.gen), Path(tmp))
        for n in args.gen:
            prompt = "photo of " + " and ".join(f"a <c{i}> thing" for i in range(n))
            kw = dict(n=1, steps=args.gen_steps, height=args.gen_size, width=args.gen_size, seed=0, registry=reg,
                      precision="fp32", device="cpu")
            first, _ = _timed(cdiff.generate, prompt, **kw)
            cached, _ = _timed(cdiff.generate, prompt, **kw)
            rows.append({"concepts": n, "first_s": round(first, 2), "cached_s": round(cached, 2)})
            print(f"gen {n} concepts: first {first:6.2f} s, cached {cached:6.2f} s", flush=True)
    return rows


def _small_registry(n: int, home: Path):
    """n entries with a one-layer delta each: `list` and token resolution read manifests, not weights."""
    import torch

    from cdiff_cli.core.delta import Delta
    from cdiff_cli.registry import Registry

    reg = Registry(home)
    w = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.zeros(4, 4)}
    for i in range(n):
        reg.create(f"e{i:04d}", Delta(w, [f"<e{i}>"], torch.zeros(1, 4), "kv"),
                   {"kind": "trained", "classes": ["thing"], "base": {"ref": "x", "fingerprint": "f"}})
    return reg


def bench_registry(args) -> list[dict]:
    from cdiff_cli.generation import resolve_prompt

    rows = []
    for n in args.entries:
        with tempfile.TemporaryDirectory() as tmp:
            reg = _small_registry(n, Path(tmp))
            env = {**os.environ, "CDIFF_HOME": str(reg.home)}
            cmd = [sys.executable, "-m", "cdiff_cli", "list", "--json"]
            listing, out = _timed(subprocess.run, cmd, env=env, capture_output=True, text=True, check=True)
            assert len(json.loads(out.stdout)) == n
            prompt = f"photo of a <e{n - 1}> thing next to a <e0> thing"
            resolve, found = _timed(resolve_prompt, reg, prompt)
            assert sorted(e.name for e in found) == ["e0000", f"e{n - 1:04d}"]
            rows.append({"entries": n, "list_s": round(listing, 3), "resolve_s": round(resolve, 4)})
            print(f"registry {n:5d} entries: cdiff list {listing:6.3f} s, token resolution {resolve:7.4f} s", flush=True)
    return rows


def main():
    import torch

    from cdiff_cli.models.base import load_pipeline

    args = parse_args()
    torch.manual_seed(0)
    if not (args.model_dir / "model_index.json").is_file():
        from _sd15 import build_sd15

        print(f"building the random SD 1.x model in {args.model_dir} ...", file=sys.stderr, flush=True)
        build_sd15().save_pretrained(str(args.model_dir))
    ref = str(args.model_dir)
    pipe = load_pipeline(ref, device="cpu")
    results = {"registry": bench_registry(args), "merge": bench_merge(args, pipe, ref), "gen": bench_gen(args, pipe, ref)}
    print("\n| concepts merged | merge command (s) | solve alone (s) |\n|---:|---:|---:|")
    for r in results["merge"]:
        print(f"| {r['concepts']} | {r['merge_s']} | {r['solve_s']} |")
    print("\n| concepts in the prompt | gen, first call (s) | gen, cached (s) |\n|---:|---:|---:|")
    for r in results["gen"]:
        print(f"| {r['concepts']} | {r['first_s']} | {r['cached_s']} |")
    print("\n| registry entries | cdiff list (s) | token resolution (s) |\n|---:|---:|---:|")
    for r in results["registry"]:
        print(f"| {r['entries']} | {r['list_s']} | {r['resolve_s']} |")
    meta = {"machine": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count(),
            **{k: str(v) for k, v in vars(args).items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, **results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
