"""The bad-input corpus: every case must fail with one clear `error: ...` line on stderr, a documented exit
code (README: 1 bad input or failure, 2 not found or usage error), no traceback, and the registry unchanged.

Image files, locks and training resume have their own tests. Two small concepts (one on the tiny SD 1.x
base, one on the tiny SD 2.x base) and their exports are made once per module; each test works on a copy
of that registry home.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from cdiff_cli.cli import app
from cdiff_cli.registry import Registry

from .conftest import RES, make_images

runner = CliRunner()
TRAIN = ["--steps", "2", "--batch-size", "2", "--resolution", str(RES), "--device", "cpu", "--reg", "none",
         "--aug-pool", "2"]
GEN = ["--steps", "2", "--device", "cpu", "--height", str(RES), "--width", str(RES)]
SKIP = ("cache", "locks")  # reusable work and lock files may change; concepts may not


# ------------------------------------------------------------------------------------------- helpers


def snapshot(home: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under the registry home (folders too, even empty ones:
    a temporary folder left behind counts as a change), except caches and locks."""
    home = Path(home)
    if not home.exists():
        return {}
    out = {}
    for p in sorted(home.rglob("*")):
        rel = p.relative_to(home)
        if rel.parts[0] in SKIP:
            continue
        out[rel.as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def check_failure(rc: int, stderr: str, stdout: str, code: int, match: str, home: Path, before: dict) -> str:
    """The shared assertions; returns the error line."""
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert rc == code, f"exit code {rc}, expected {code}; stderr:\n{stderr}"
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert match.lower() in line.lower(), f"{match!r} not in {line!r}"
    assert "Traceback" not in stderr + stdout
    assert snapshot(home) == before, "the registry changed"
    print(line)  # shown by `pytest -rP`: the corpus's messages, for review
    return line


def expect_failure(args, code: int, match: str, home: Path, **invoke) -> str:
    """Run `cdiff ARGS` in-process (CliRunner) and check the failure; returns the error line."""
    before = snapshot(home)
    r = runner.invoke(app, [str(a) for a in args], **invoke)
    return check_failure(r.exit_code, r.stderr, r.stdout, code, match, home, before)


def run_cdiff(args, home: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "CDIFF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "cdiff_cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def expect_failure_process(args, code: int, match: str, home: Path, env: dict | None = None, timeout: float = 120) -> str:
    """The same checks on a real `python -m cdiff_cli` process."""
    before = snapshot(home)
    p = run_cdiff(args, home, env, timeout)
    return check_failure(p.returncode, p.stderr, p.stdout, code, match, home, before)


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory, sd1_base, sd2_base):
    """A registry with `mycat` (sd1, token <mycat>) and `sd2cat` (sd2, token <sd2cat>), plus exports of both."""
    root = tmp_path_factory.mktemp("bad-inputs")
    images = make_images(root / "imgs")
    home = root / "home"
    env = {"CDIFF_HOME": str(home), "CDIFF_BASE": None}
    for name, base in (("mycat", sd1_base), ("sd2cat", sd2_base)):
        r = runner.invoke(app, ["-q", "train", name, str(images), "--class", "cat", "--base", str(base), *TRAIN], env=env)
        assert r.exit_code == 0, r.output
    exports = root / "exports"
    for args in (["mycat", "--format", "cdiff"], ["sd2cat", "--format", "diffusers"]):
        r = runner.invoke(app, ["export", *args, "-o", str(exports / f"{args[0]}-{args[2]}")], env=env)
        assert r.exit_code == 0, r.output
    return {"home": home, "images": images, "exports": exports, "sd1": sd1_base, "sd2": sd2_base}


@pytest.fixture
def home(world, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the module's registry home, as CDIFF_HOME."""
    h = tmp_path / "home"
    shutil.copytree(world["home"], h)
    monkeypatch.setenv("CDIFF_HOME", str(h))
    monkeypatch.delenv("CDIFF_BASE", raising=False)
    return h


# ------------------------------------------------------------------------------------------- names

BAD_NAMES = {
    "dotdot": "../x",
    "slash": "a/b",
    "empty": "",
    "too-long": "x" * 65,
    "non-ascii": "café",
    "leading-dot": ".x",
    "leading-dash": "-x",
    "space": "my cat",
    "newline": "x\n",
}


def name_args(cmd: str, name: str, w: dict, out: Path) -> list:
    """Options first, then `--`, so that a name starting with '-' stays a name."""
    return {
        "train": ["train", "--class", "cat", "--base", w["sd1"], *TRAIN, "--", name, w["images"]],
        "add": ["add", "--base", w["sd1"], "--", name, w["exports"] / "mycat-cdiff"],
        "merge": ["merge", f"--name={name}", "--", "mycat", "sd2cat"],
        "show": ["show", "--", name],
        "rm": ["rm", "-y", "--", name],
        "export": ["export", "-o", out, "--", name],
        "path": ["path", "--", name],
    }[cmd]


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
@pytest.mark.parametrize("cmd", ["train", "add", "merge"])
def test_bad_name_for_a_new_entry(cmd, name, home, world, tmp_path):
    expect_failure(name_args(cmd, name, world, tmp_path / "out"), 1, "invalid name", home)


@pytest.mark.parametrize(
    "cmd, name",
    [pytest.param(cmd, name, id=f"{cmd}-{key}") for cmd in ("show", "rm", "export", "path")
     for key, name in BAD_NAMES.items() if (cmd, name) != ("path", "")],  # `cdiff path ''` is the home
)
def test_bad_name_of_an_existing_entry_is_not_found(cmd, name, home, world, tmp_path):
    expect_failure(name_args(cmd, name, world, tmp_path / "out"), 2, "no concept named", home)
    assert not (tmp_path / "out").exists()


def test_existing_name_is_not_replaced_without_force(home, world):
    expect_failure(["train", "mycat", world["images"], "--class", "cat", "--base", world["sd1"], *TRAIN], 1,
                   "already exists", home)
    expect_failure(["add", "mycat", world["exports"] / "mycat-cdiff", "--base", world["sd1"]], 1, "already exists", home)


# ------------------------------------------------------------------------------------------- tokens


@pytest.mark.parametrize(
    "token, match",
    [
        ("cat", "too short"),  # a vocabulary word, and short enough to split others (`cat` in `catalog`)
        ("chair", "ordinary word"),
        ("<MyCat>", "already used by concept 'mycat'"),  # tokens are case-insensitive
        ("my token", "invalid token"),
        # the token grammar: no special tokens, no punctuation alone, printable ASCII only
        ("<|endoftext|>", "special tokens"),
        ("<|startoftext|>", "special tokens"),
        (".", "needs a letter or a digit"),
        ("<>", "needs a letter or a digit"),
        ("a\u200bb1", "printable ASCII"),  # a zero-width space inside
        ("caf\u00e9x1", "printable ASCII"),
        ("v1;", "semicolons"),
    ],
)
def test_train_token_collision(token, match, home, world):
    expect_failure(["train", "x", world["images"], "--class", "cat", "--token", token, "--base", world["sd1"], *TRAIN],
                   1, match, home)


def test_joint_training_with_one_token_twice(home, world):
    concept = f"<twin>:cat:{world['images']}"
    expect_failure(["train", "x", "--concept", concept, "--concept", concept.replace("twin", "TWIN"),
                    "--base", world["sd1"], *TRAIN], 1, "<twin>", home)


def test_add_token_of_another_concept(home, world):
    # The cdiff export of `mycat` carries the token <mycat>, which `mycat` owns.
    expect_failure(["add", "copy", world["exports"] / "mycat-cdiff", "--base", world["sd1"]], 1,
                   "already used by concept 'mycat'", home)


@pytest.mark.parametrize("token, match", [("<|endoftext|>", "special tokens"), (".", "needs a letter or a digit")])
def test_add_rename_to_a_token_outside_the_grammar(token, match, home, world):
    expect_failure(["add", "copy", world["exports"] / "mycat-cdiff", "--token", token, "--base", world["sd1"]], 1,
                   match, home)


def test_add_embedding_file_naming_a_special_token(home, world, tmp_path):
    """A token name carried inside an imported file is held to the same grammar."""
    folder = tmp_path / "exp"
    shutil.copytree(world["exports"] / "sd2cat-diffusers", folder)
    token_file = next(p for p in folder.glob("*.safetensors") if p.name != "pytorch_custom_diffusion_weights.safetensors")
    from safetensors.torch import load_file, save_file

    (value,) = load_file(str(token_file)).values()
    save_file({"<|endoftext|>": value}, str(token_file))
    expect_failure(["add", "evil", folder, "--base", world["sd2"]], 1, "special tokens", home)


def test_gen_warns_when_the_token_falls_past_the_77_token_limit(home, tmp_path):
    long = "a " * 80 + "photo of a <mycat> cat"
    r = runner.invoke(app, ["gen", long, *GEN, "-o", str(tmp_path / "g")])
    assert r.exit_code == 0, r.output
    assert "<mycat> falls past the limit" in r.stderr
    r = runner.invoke(app, ["gen", "photo of a <mycat> cat", *GEN, "-o", str(tmp_path / "g")])
    assert r.exit_code == 0 and "past the limit" not in r.stderr


def test_add_rename_to_a_vocabulary_word(home, world):
    expect_failure(["add", "copy", world["exports"] / "mycat-cdiff", "--token", "chair", "--base", world["sd1"]], 1,
                   "ordinary word", home)


def test_gen_prompt_with_an_unknown_token(home, tmp_path):
    expect_failure(["gen", "photo of a <mycat> cat and a <nobody> dog", *GEN, "-o", tmp_path / "g"], 2, "<nobody>", home)
    assert not (tmp_path / "g").exists()


# ------------------------------------------------------------------------------------------- bases


def test_merge_across_different_bases(home):
    expect_failure(["merge", "mycat", "sd2cat"], 1, "different base models", home)


def test_add_delta_of_another_architecture(home, world):
    # An SD 2.x concept (wider cross-attention inputs) exported, then imported onto the SD 1.x base.
    expect_failure(["add", "x", world["exports"] / "sd2cat-diffusers", "--token", "<x2>", "--base", world["sd1"]], 1,
                   "another base model", home)


def test_gen_concept_on_another_base(home, world, tmp_path):
    expect_failure(["gen", "photo of a <sd2cat> cat", *GEN, "--base", world["sd1"], "-o", tmp_path / "g"], 1,
                   "belongs to base", home)


def test_unreachable_hub_offline(home, tmp_path):
    line = expect_failure(["gen", "photo of a cat", *GEN, "--base", "some-org/some-model", "-o", tmp_path / "g"], 1,
                          "cannot load base model some-org/some-model", home)
    assert "HF_HUB_OFFLINE=1" in line and "--base" in line


def test_unreachable_hub_connection_refused(home, tmp_path):
    """A real process with the offline switch off and the hub endpoint on a closed port."""
    env = {"HF_HUB_OFFLINE": None, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    line = expect_failure_process(["gen", "photo of a cat", *GEN, "--base", "some-org/some-model", "-o", tmp_path / "g"],
                                  1, "cannot load base model some-org/some-model", home, env=env, timeout=120)
    assert "unreachable" in line


@pytest.mark.parametrize("kind", ["missing", "no-model-index", "bad-model-index", "garbage-file"])
def test_gen_with_an_unreadable_base(kind, home, tmp_path):
    base = tmp_path / "base"
    code, match = 1, "cannot load base model"
    if kind == "missing":
        base, code, match = tmp_path / "no-such-base", 2, "base not found"
    elif kind == "no-model-index":
        base.mkdir()
        match = "not a diffusers model folder"
    elif kind == "bad-model-index":
        base.mkdir()
        (base / "model_index.json").write_text("{not json")
    else:
        base = tmp_path / "base.safetensors"
        base.write_bytes(os.urandom(4096))
    expect_failure(["gen", "photo of a cat", *GEN, "--base", base, "-o", tmp_path / "g"], code, match, home)


# ------------------------------------------------------------------------------------------- delta files


def safetensors_bytes(header: bytes, claimed: int | None = None, body: bytes = b"") -> bytes:
    return (len(header) if claimed is None else claimed).to_bytes(8, "little") + header + body


MALFORMED = {
    "random-bytes": lambda: os.urandom(1000),
    "garbage-json": lambda: safetensors_bytes(b"{this is not json" + b" " * 20, body=b"\0" * 64),
    "header-too-long": lambda: safetensors_bytes(b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}',
                                                 claimed=10**6, body=b"\0" * 16),
    "data-past-the-end": lambda: safetensors_bytes(b'{"a": {"dtype": "F32", "shape": [4096], "data_offsets": [0, 16384]}}',
                                                   body=b"\0" * 16),
    "empty": lambda: b"",
}


@pytest.mark.parametrize("make", MALFORMED.values(), ids=MALFORMED.keys())
def test_add_malformed_safetensors(make, home, world, tmp_path):
    f = tmp_path / "delta.safetensors"
    f.write_bytes(make())
    expect_failure(["add", "x", f, "--base", world["sd1"]], 1, "delta.safetensors", home)
    # The same file as a diffusers folder's weights.
    folder = tmp_path / "diffusers"
    folder.mkdir()
    shutil.copyfile(f, folder / "pytorch_custom_diffusion_weights.safetensors")
    expect_failure(["add", "x", folder, "--base", world["sd1"]], 1, "pytorch_custom_diffusion_weights", home)


def test_damaged_entry_delta(home, tmp_path):
    d = home / "concepts" / "mycat" / "delta.safetensors"
    d.write_bytes(d.read_bytes()[: d.stat().st_size // 2])
    expect_failure(["gen", "photo of a <mycat> cat", *GEN, "-o", tmp_path / "g"], 1, "cannot read delta", home)
    expect_failure(["export", "mycat", "--format", "reference", "-o", tmp_path / "e"], 1, "cannot read delta", home)


class _Payload:
    """Unpickling this runs `fn(*args)`: what a malicious delta would do."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_pickle_that_runs_code_is_refused(home, world, tmp_path):
    """A reference delta.bin whose unpickling runs a shell command, in a real process: refused, and the
    command never ran."""
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"unet": _Payload(os.system, f"touch {sentinel}"), "modifier_token": {}}, evil / "delta.bin")
    line = expect_failure_process(["add", "x", evil / "delta.bin", "--base", world["sd1"]], 1, "weights_only", home)
    assert "system" in line  # names what the file tried to call
    assert not sentinel.exists()
    # The control: an unrestricted load really would have run it.
    torch.load(evil / "delta.bin", weights_only=False)
    assert sentinel.exists()


def test_pickled_checkpoint_that_writes_a_file_is_refused(home, world, tmp_path):
    sentinel = tmp_path / "written"
    torch.save({"state_dict": _Payload(open, str(sentinel), "w")}, tmp_path / "delta_epoch=1.ckpt")
    expect_failure(["add", "x", tmp_path / "delta_epoch=1.ckpt", "--base", world["sd1"]], 1, "not a plain tensor file", home)
    assert not sentinel.exists()
    # A plain pickle (not torch's zip format) of the same.
    (tmp_path / "delta.bin").write_bytes(pickle.dumps(_Payload(open, str(sentinel), "w")))
    expect_failure(["add", "x", tmp_path / "delta.bin", "--base", world["sd1"]], 1, "not a plain tensor file", home)
    assert not sentinel.exists()


def test_add_missing_path(home, tmp_path):
    expect_failure(["add", "x", tmp_path / "nothing-here"], 2, "not found", home)


def test_add_folder_without_a_delta(home, world, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    expect_failure(["add", "x", tmp_path / "empty", "--base", world["sd1"]], 1, "unknown folder layout", home)


def test_add_single_token_file(home, world, tmp_path):
    token_file = world["exports"] / "sd2cat-diffusers" / "<sd2cat>.safetensors"
    expect_failure(["add", "x", token_file, "--base", world["sd2"]], 1, "single token embedding", home)


def test_add_class_count_mismatch(home, world):
    expect_failure(["add", "x", world["exports"] / "mycat-cdiff", "--token", "<c9>", "--class", "cat", "--class", "dog",
                    "--base", world["sd1"]], 1, "--class was given 2 time(s)", home)


# ------------------------------------------------------------------------------------------- missing things


@pytest.mark.parametrize(
    "args",
    [
        ["show", "ghost"],
        ["rm", "-y", "mycat", "ghost"],  # all must exist: mycat stays
        ["export", "ghost", "-o", "OUT"],
        ["gen", "a photo", "-c", "ghost", *GEN, "-o", "OUT"],
        ["compress", "ghost"],
        ["eval", "ghost"],
        ["path", "ghost"],
        ["merge", "mycat", "ghost"],
    ],
    ids=lambda a: a[0],
)
def test_missing_concept(args, home, tmp_path):
    args = [tmp_path / "out" if a == "OUT" else a for a in args]
    expect_failure(args, 2, "no concept named 'ghost'", home)
    assert not (tmp_path / "out").exists()


def test_export_onto_an_existing_file(home, tmp_path):
    f = tmp_path / "taken"
    f.write_text("keep me")
    for fmt in ("diffusers", "reference", "cdiff"):
        expect_failure(["export", "mycat", "--format", fmt, "-o", f], 1, "not a folder", home)
    assert f.read_text() == "keep me"


def test_rm_without_an_answer(home):
    """`rm` asks first (on stderr); end of input is no answer: one error line after the question."""
    before = snapshot(home)
    r = runner.invoke(app, ["rm", "mycat"], input="")
    question, *rest = [x for x in r.stderr.splitlines() if x.strip()]
    assert question.startswith("Remove mycat?")
    check_failure(r.exit_code, "\n".join(rest), r.stdout, 1, "aborted: nothing was changed", home, before)


def test_merge_needs_different_concepts(home):
    expect_failure(["merge", "mycat", "mycat"], 1, "only once", home)


# ------------------------------------------------------------------------------------------- option values


BAD_OPTIONS = {
    "train-steps-0": (["train", "x", "IMGS", "--class", "cat", "--base", "SD1", *TRAIN, "--steps", "0"], 2, "'--steps'"),
    "train-batch-size-0": (["train", "x", "IMGS", "--class", "cat", "--batch-size", "0"], 2, "'--batch-size'"),
    "train-lr-nan": (["train", "x", "IMGS", "--class", "cat", "--base", "SD1", *TRAIN, "--lr", "nan"], 1, "finite"),
    "train-lr-inf": (["train", "x", "IMGS", "--class", "cat", "--base", "SD1", *TRAIN, "--lr", "inf"], 1, "finite"),
    "train-resolution-0": (["train", "x", "IMGS", "--class", "cat", "--resolution", "0"], 2, "'--resolution'"),
    "train-aug-pool-negative": (["train", "x", "IMGS", "--class", "cat", "--aug-pool", "-1"], 2, "'--aug-pool'"),
    "train-num-reg-negative": (["train", "x", "IMGS", "--class", "cat", "--num-reg", "-5"], 2, "'--num-reg'"),
    "train-checkpoint-every-negative": (["train", "x", "IMGS", "--class", "cat", "--checkpoint-every", "-1"], 2, "'--checkpoint-every'"),
    "train-resume-nothing": (["train", "x", "IMGS", "--class", "cat", "--base", "SD1", *TRAIN, "--resume"], 2, "nothing to resume"),
    "train-steps-not-a-number": (["train", "x", "IMGS", "--class", "cat", "--steps", "many"], 2, "'--steps'"),
    "train-mode-bogus": (["train", "x", "IMGS", "--class", "cat", "--mode", "everything"], 2, "'--mode'"),
    "train-no-class": (["train", "x", "IMGS", "--base", "SD1", *TRAIN], 1, "--class"),
    "train-no-name": (["train"], 2, "missing argument"),
    "gen-steps-0": (["gen", "a photo", "--steps", "0"], 2, "'--steps'"),
    "gen-num-0": (["gen", "a photo", "-n", "0"], 2, "'-n'"),
    "gen-batch-size-0": (["gen", "a photo", "--batch-size", "0"], 2, "'--batch-size'"),
    "gen-scheduler-bogus": (["gen", "a photo", "--scheduler", "bogus"], 2, "'--scheduler'"),
    "export-format-bogus": (["export", "mycat", "-o", "OUT", "--format", "bogus"], 2, "'--format'"),
    "export-no-out": (["export", "mycat"], 2, "'-o'"),
    "export-rank-0": (["export", "mycat", "-o", "OUT", "--format", "lora", "--rank", "0"], 1, "--rank"),
    "export-rank-not-lora": (["export", "mycat", "-o", "OUT", "--rank", "4"], 1, "--format lora only"),
    "compress-energy-1.5": (["compress", "mycat", "--energy", "1.5"], 1, "--energy"),
    "compress-rank-and-energy": (["compress", "mycat", "--rank", "2", "--energy", "0.9"], 1, "not both"),
    "merge-ridge-not-a-number": (["merge", "mycat", "sd2cat", "--ridge", "lots"], 2, "'--ridge'"),
    "merge-ridge-negative": (["merge", "mycat", "sd2cat", "--ridge", "-1"], 1, "--ridge must be a positive number"),
    "merge-ridge-nan": (["merge", "mycat", "sd2cat", "--ridge", "nan"], 1, "--ridge must be a positive number"),
    # Sizes and counts past any real use stop at once instead of being OOM-killed or running for days.
    "gen-steps-1e9": (["gen", "a photo", "--steps", "1000000000"], 2, "'--steps'"),
    "gen-height-100000": (["gen", "a photo", "--height", "100000"], 2, "'--height'"),
    "gen-num-1e9": (["gen", "a photo", "-n", "1000000000"], 2, "'-n'"),
    "gen-guidance-nan": (["gen", "a photo", "--guidance", "nan"], 2, "'--guidance'"),
    "gen-guidance-inf": (["gen", "a photo", "--guidance", "inf"], 2, "'--guidance'"),
    "gen-seed-2-64": (["gen", "a photo", "--seed", str(2**64)], 2, "'--seed'"),
    "train-batch-size-100000": (["train", "x", "IMGS", "--class", "cat", "--batch-size", "100000"], 2, "'--batch-size'"),
    "train-resolution-100000": (["train", "x", "IMGS", "--class", "cat", "--resolution", "100000"], 2, "'--resolution'"),
    "train-seed-negative": (["train", "x", "IMGS", "--class", "cat", "--seed", "-1"], 2, "'--seed'"),
    "eval-steps-1e9": (["eval", "mycat", "--steps", "1000000000"], 2, "'--steps'"),
    "eval-guidance-nan": (["eval", "mycat", "--guidance", "nan"], 2, "'--guidance'"),
    "unknown-command": (["bogus"], 2, "no such command"),
    "unknown-option": (["list", "--bogus"], 2, "no such option"),
}


@pytest.mark.parametrize("args, code, match", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_bad_option_values(args, code, match, home, world, tmp_path):
    subst = {"IMGS": world["images"], "SD1": world["sd1"], "OUT": tmp_path / "out"}
    expect_failure([subst.get(a, a) for a in args], code, match, home)
    assert not (tmp_path / "out").exists()


def test_usage_error_in_a_real_process_is_one_line(home, world):
    line = expect_failure_process(["train", "x", world["images"], "--class", "cat", "--steps", "many"], 2,
                                  "invalid value for '--steps'", home)
    assert "--help" in line  # points at the help, on the same line
    p = run_cdiff(["train", "--help"], home)
    assert p.returncode == 0 and "Usage" in p.stdout and p.stderr == ""
    p = run_cdiff(["--version"], home)
    assert p.returncode == 0 and p.stdout.startswith("cdiff ")


# ------------------------------------------------------------------------------------------- failures while running


def test_disk_full_while_saving(home, world, monkeypatch):
    """The write of the delta fails half-way: one line, nothing in the registry, no temporary folder."""
    import cdiff_cli.core.delta as delta_mod

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1024)  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(delta_mod, "save_file", full_disk)
    before = sorted(p.name for p in (home / "concepts").iterdir())
    expect_failure(["add", "copy", world["exports"] / "mycat-cdiff", "--token", "<copycat>", "--base", world["sd1"]], 1,
                   "cannot save concept 'copy': no space left on device", home)
    assert sorted(p.name for p in (home / "concepts").iterdir()) == before  # no .tmp-* folder


def test_nan_loss_stops_with_a_message(home, world):
    """A learning rate so large that the weights overflow after the first step: the loss is no longer
    finite and training stops; no entry, no checkpoint. (-q: the progress lines before it are not errors.)"""
    args = ["--steps", "4", "--batch-size", "2", "--resolution", RES, "--device", "cpu", "--reg", "none", "--aug-pool", "2"]
    expect_failure(["-q", "train", "x", world["images"], "--class", "cat", "--base", world["sd1"], *args,
                    "--lr", "1e30", "--precision", "fp32"], 1, "training diverged at step", home)



# ------------------------------------------------------------------------------------------- image folders


def _photo(path: Path, colour=(200, 40, 40), size=(64, 48), **save) -> Path:
    im = Image.new("RGB", size, (30, 90, 160))
    ImageDraw.Draw(im).ellipse((8, 8, 40, 40), fill=colour)
    im.save(path, **save)
    return path


def _bomb_png(path: Path, side: int = 20000) -> Path:
    """A small valid PNG whose header claims side x side pixels (Pillow refuses it at open)."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def _folder_with(tmp_path: Path, bad: str) -> tuple[Path, str]:
    """Two good photos plus one bad file of kind `bad`; returns (folder, the bad file's name)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    _photo(folder / "a.png")
    _photo(folder / "b.png", colour=(40, 200, 40))
    if bad == "not-an-image":
        (folder / "c.jpg").write_text("this is not a photo")
        return folder, "c.jpg"
    if bad == "truncated":
        data = _photo(tmp_path / "full.jpg", quality=90).read_bytes()
        (folder / "c.jpg").write_bytes(data[: len(data) // 2])
        return folder, "c.jpg"
    if bad == "animated":
        frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0))]
        frames[0].save(folder / "c.gif", save_all=True, append_images=frames[1:], duration=100)
        return folder, "c.gif"
    if bad == "tiny":
        _photo(folder / "c.png", size=(8, 8))
        return folder, "c.png"
    if bad == "huge":
        _bomb_png(folder / "c.png")
        return folder, "c.png"
    if bad == "duplicate":
        (folder / "c.png").write_bytes((folder / "a.png").read_bytes())
        return folder, "c.png"
    raise AssertionError(bad)


BAD_IMAGES = {
    "not-an-image": "not an image",
    "truncated": "truncated or corrupt",
    "animated": "animated",
    "tiny": "at least 32 px",
    "huge": "too large",
    "duplicate": "is a copy of",
}


@pytest.mark.parametrize("bad, match", BAD_IMAGES.items(), ids=BAD_IMAGES.keys())
def test_bad_image_in_the_folder(bad, match, home, world, tmp_path):
    """Refused before any model is loaded (no --base given: the default hub base is never touched)."""
    folder, name = _folder_with(tmp_path, bad)
    line = expect_failure(["train", "x", folder, "--class", "cat", *TRAIN], 1, match, home)
    assert name in line


def test_missing_image_folder(home, tmp_path):
    expect_failure(["train", "x", tmp_path / "nowhere", "--class", "cat"], 2, "image folder not found", home)


def test_empty_image_folder(home, tmp_path):
    (tmp_path / "empty").mkdir()
    expect_failure(["train", "x", tmp_path / "empty", "--class", "cat"], 1, "no images", home)


def test_folder_of_non_image_files(home, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    (folder / "IMG_1.heic").write_bytes(b"\0" * 64)
    expect_failure(["train", "x", folder, "--class", "cat"], 1, "skipped 2 other files", home)


def test_unusual_but_valid_images_train(home, world, tmp_path):
    """EXIF-rotated, CMYK, 16-bit, palette and transparent images are handled, not refused."""
    folder = tmp_path / "phone"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown upright
    _photo(folder / "rotated.jpg", size=(64, 48), exif=exif, quality=95)
    Image.new("CMYK", (48, 48), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((48, 48), 40000, np.uint16)).save(folder / "grey16.png")
    Image.open(_photo(tmp_path / "p.png")).convert("P").save(folder / "palette.png", transparency=0)
    rgba = Image.new("RGBA", (48, 48), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).ellipse((8, 8, 40, 40), fill=(200, 40, 40, 255))
    rgba.save(folder / "alpha.png")
    r = runner.invoke(app, ["-q", "train", "phone", str(folder), "--class", "cat", "--base", str(world["sd1"]), *TRAIN])
    assert r.exit_code == 0, r.output
    entry = Registry(home).get("phone")
    assert sorted(i["file"] for i in entry.manifest["concepts"][0]["images"]) == sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------- misaimed writes


@pytest.mark.parametrize("where", ["an entry", "the concepts folder", "the home", "the cache"])
@pytest.mark.parametrize("fmt", ["cdiff", "diffusers"])
def test_export_into_the_registry_is_refused(where, fmt, home):
    """`export -o $CDIFF_HOME/concepts/other` used to overwrite entry `other` and exit 0."""
    out = {"an entry": home / "concepts" / "sd2cat", "the concepts folder": home / "concepts", "the home": home,
           "the cache": home / "cache" / "x"}[where]
    expect_failure(["export", "mycat", "--format", fmt, "-o", out], 1, "inside the registry", home)


def test_gen_into_the_registry_is_refused(home):
    expect_failure(["gen", "photo of a <mycat> cat", *GEN, "-o", home / "concepts" / "fake"], 1, "inside the registry",
                   home)
    assert not (home / "concepts" / "fake").exists()


def test_eval_into_the_registry_is_refused(home):
    expect_failure(["eval", "mycat", "-o", home / "concepts" / "mycat", "--device", "cpu"], 1, "inside the registry", home)


def test_export_never_overwrites_the_users_files_without_force(home, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "delta.safetensors").write_bytes(b"my own file")
    (out / "notes.txt").write_text("keep me")
    expect_failure(["export", "mycat", "--format", "cdiff", "-o", out], 1, "already exists", home)
    assert (out / "delta.safetensors").read_bytes() == b"my own file"
    assert sorted(p.name for p in out.iterdir()) == ["delta.safetensors", "notes.txt"]  # nothing else written
    assert not list(tmp_path.glob(".cdiff-export-*"))  # the staging folder is gone
    r = runner.invoke(app, ["export", "mycat", "--format", "cdiff", "-o", str(out), "--force"])
    assert r.exit_code == 0, r.output
    assert (out / "delta.safetensors").read_bytes() != b"my own file" and (out / "notes.txt").read_text() == "keep me"
    assert (out / "manifest.json").is_file() and (out / "cdiff_base.json").is_file()
    # a second export of the same files is refused too
    expect_failure(["export", "mycat", "--format", "cdiff", "-o", out], 1, "already exists", home)


def test_rm_of_a_name_given_twice_removes_it_once(home):
    r = runner.invoke(app, ["rm", "-y", "mycat", "mycat"])
    assert r.exit_code == 0, r.output
    assert not (home / "concepts" / "mycat").exists() and (home / "concepts" / "sd2cat").exists()


def test_a_token_taken_while_a_run_trained_is_refused_when_the_entry_is_written(home):
    """Two runs of different names with one token both pass the check when they start; the second to
    finish must not make a second owner of the token."""
    reg = Registry(home)
    delta = reg.get("mycat").load_delta()
    before = snapshot(home)
    with pytest.raises(Exception, match="already used by concept 'mycat'"):
        reg.create("late", delta, {"kind": "trained", "classes": ["cat"], "parents": []})
    assert snapshot(home) == before and not list((home / "concepts").glob(".tmp-*"))
    # a merge shares its parents' tokens, and replacing an entry keeps its own
    reg.create("m", delta, {"kind": "merged", "classes": ["cat"], "parents": [{"name": "mycat"}]})
    reg.create("mycat", delta, {**reg.get("mycat").manifest}, overwrite=True)


# ------------------------------------------------------------------------------------------- what deltas contain


def _rewrite_tensors(src: Path, dst: Path, change) -> Path:
    """A copy of the safetensors file `src` at `dst` (a cdiff delta, a LoRA), its tensors and metadata passed
    through `change(tensors, meta)`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors, meta)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _first_layer(tensors: dict) -> str:
    return next(k for k in tensors if k.startswith("unet."))


def _exported_lora(tmp_path: Path, change) -> Path:
    """`mycat` exported as a LoRA folder, its LoRA file's tensors passed through `change(tensors, meta)`."""
    out = tmp_path / "lora"
    r = runner.invoke(app, ["export", "mycat", "--format", "lora", "-o", str(out)])
    assert r.exit_code == 0, r.output
    _rewrite_tensors(out / "mycat.safetensors", out / "mycat.safetensors", change)
    return out


def _nan(t, m):
    t[_first_layer(t)][0, 0] = float("nan")


def _inf_embedding(t, m):
    t["text.token_embeddings"][0, 0] = float("inf")


def _ints(t, m):
    k = _first_layer(t)
    t[k] = t[k].to(torch.int32)


def _bools(t, m):
    k = _first_layer(t)
    t[k] = t[k] > 0


def _whole_unet_layer(t, m):
    k = _first_layer(t)
    t[k.replace("attn2.to_k", "attn1.to_q")] = t[k].clone()


def _qout_in_kv_mode(t, m):
    k = _first_layer(t)
    t[k.replace("attn2.to_k", "attn2.to_q").replace("attn2.to_v", "attn2.to_q")] = t[k].clone()


def _unknown_mode(t, m):
    m["mode"] = "everything"


def _no_token(t, m):
    m["tokens"] = "[]"
    t["text.token_embeddings"] = t["text.token_embeddings"][:0].contiguous()


def _no_tokens_metadata(t, m):
    del m["tokens"]  # was `KeyError: 'tokens'`


def _tokens_not_a_list(t, m):
    m["tokens"] = '{"a": 1}'


BAD_CONTENT = {
    "tokens-metadata-missing": (_no_tokens_metadata, "token list"),
    "tokens-metadata-not-a-list": (_tokens_not_a_list, "token list"),
    "nan-weight": (_nan, "NaN or infinite"),
    "inf-embedding": (_inf_embedding, "NaN or infinite"),
    "int-weights": (_ints, "int32 values"),
    "bool-weights": (_bools, "bool values"),
    "a-self-attention-layer": (_whole_unet_layer, "not a cross-attention"),
    "q-in-kv-mode": (_qout_in_kv_mode, "not a cross-attention"),
    "unknown-mode": (_unknown_mode, "mode 'everything'"),
    "no-token": (_no_token, "no token"),
}


@pytest.mark.parametrize("change, match", BAD_CONTENT.values(), ids=BAD_CONTENT.keys())
def test_add_refuses_what_a_delta_must_not_contain(change, match, home, world, tmp_path):
    src = world["exports"] / "mycat-cdiff"
    folder = tmp_path / "bad"
    shutil.copytree(src, folder)
    _rewrite_tensors(src / "delta.safetensors", folder / "delta.safetensors", change)
    expect_failure(["add", "evil", folder, "--base", world["sd1"]], 1, match, home)


@pytest.mark.parametrize("alpha, match", [(0.0, "alpha is 0.0"), (float("nan"), "alpha is nan"), (-4.0, "alpha is -4.0"),
                                          ([1.0, 2.0], "not a single number")])
def test_add_refuses_a_lora_with_a_bad_alpha(alpha, match, home, world, tmp_path):
    def bad_alpha(tensors, meta):
        key = next(k for k in tensors if k.endswith(".alpha"))
        tensors[key] = torch.tensor(alpha, dtype=torch.float32)

    out = _exported_lora(tmp_path, bad_alpha)
    expect_failure(["add", "evil", out, "--base", world["sd1"], "--token", "<evil>"], 1, match, home)


def test_an_entry_whose_delta_was_poisoned_is_refused_on_read_and_found_by_doctor(home, tmp_path):
    """A registry entry rewritten by hand (content hash updated too) with NaN weights: `gen` refuses it in one
    line instead of drawing black images, and `doctor` names it."""
    entry = home / "concepts" / "mycat"
    _rewrite_tensors(entry / "delta.safetensors", entry / "delta.safetensors", _nan)
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["content_hash"] = "sha256:" + hashlib.sha256((entry / "delta.safetensors").read_bytes()).hexdigest()
    (entry / "manifest.json").write_text(json.dumps(manifest))
    expect_failure(["gen", "photo of a <mycat> cat", *GEN, "-o", tmp_path / "g"], 1, "NaN or infinite", home)
    assert not (tmp_path / "g").exists()
    r = runner.invoke(app, ["doctor", "--json"])
    found = json.loads(r.stdout)
    assert any(f["name"] == "mycat" and "NaN" in f["detail"] for f in found), found


def test_a_pickle_that_would_inflate_past_the_limit_is_refused_before_it_is_read(home, world, tmp_path, monkeypatch):
    """A zip member can inflate a thousandfold (an 8 MB delta.bin to 8 GiB); the declared sizes are checked
    first. The limit is lowered here so that the test file stays small."""
    import zipfile

    from cdiff_cli.formats import sniff

    monkeypatch.setattr(sniff, "MAX_EXPANDED_BYTES", 1_000_000)
    bomb = tmp_path / "bomb" / "delta.bin"
    bomb.parent.mkdir()
    torch.save({"unet": {"x": torch.zeros(300_000)}, "modifier_token": {"<b>": torch.zeros(4)}}, bomb)
    with zipfile.ZipFile(bomb) as z:
        assert sum(i.file_size for i in z.infolist()) > 1_000_000
    assert bomb.stat().st_size > 1_000_000  # (torch.save stores; a real bomb deflates: same declared size)
    expect_failure(["add", "bomb", bomb.parent, "--base", world["sd1"]], 1, "would expand to", home)


def test_add_of_a_fifo_does_not_wait_forever(home, world, tmp_path):
    fifo = tmp_path / "delta.bin"
    os.mkfifo(fifo)
    expect_failure_process(["add", "pipe", fifo, "--base", world["sd1"]], 1, "not a regular file", home, timeout=60)


# ------------------------------------------------------------------------------------------- a damaged registry


@pytest.mark.parametrize("field, value", [("size_bytes", "big"), ("created", 5), ("parents", [1, {"x": 2}]),
                                          ("id", ["a"]), ("kind", 3), ("mode", None), ("train", "lots"),
                                          ("compression", {"min_rank": 1}), ("source", [1]), ("metrics", {"baseline": 4})])
def test_a_hand_edited_manifest_field_never_breaks_list_or_show(field, value, home):
    path = home / "concepts" / "mycat" / "manifest.json"
    m = json.loads(path.read_text())
    m[field] = value
    path.write_text(json.dumps(m))
    for args in (["list"], ["list", "--json"], ["show", "mycat"], ["show", "sd2cat"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, (args, r.output)
        assert "Traceback" not in r.output
        assert "sd2cat" in r.stdout if args[0] == "list" else args[1] in r.stdout


def test_a_swapped_delta_is_refused_by_its_content_hash(home, tmp_path):
    shutil.copyfile(home / "concepts" / "sd2cat" / "delta.safetensors", home / "concepts" / "mycat" / "delta.safetensors")
    expect_failure(["gen", "photo of a <mycat> cat", *GEN, "-o", tmp_path / "g"], 1, "content_hash", home)


def test_a_home_that_is_a_file_is_refused(tmp_path, monkeypatch):
    f = tmp_path / "home"
    f.write_text("not a folder")
    monkeypatch.setenv("CDIFF_HOME", str(f))
    r = runner.invoke(app, ["list"])
    assert r.exit_code == 1 and r.stderr.strip() == f"error: the registry home {f} is not a folder (set CDIFF_HOME to a folder)"


def test_gen_with_two_concepts_on_a_read_only_registry(home, world, tmp_path, monkeypatch):
    """The merge cache cannot be written (a read-only mount): the merge is made in memory, and `gen` works."""
    r = runner.invoke(app, ["add", "twin", str(world["exports"] / "mycat-cdiff"), "--token", "<twin>",
                            "--base", str(world["sd1"])])
    assert r.exit_code == 0, r.output

    def read_only(self, *parts):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(Registry, "cache_dir", read_only)
    r = runner.invoke(app, ["gen", "a <mycat> cat and a <twin> cat", *GEN, "-o", str(tmp_path / "g"), "--json"])
    assert r.exit_code == 0, r.output
    assert sorted(json.loads(r.stdout)["concepts"]) == ["mycat", "twin"]
    assert not list((home / "cache").glob("merges/*"))


# ------------------------------------------------------------------------------------------- paths from files


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/hostname", "sub/../../outside.safetensors", 5])
def test_an_export_manifest_naming_a_file_outside_its_folder_is_refused(name, home, world, tmp_path):
    folder = tmp_path / "exp"
    shutil.copytree(world["exports"] / "sd2cat-diffusers", folder)
    shutil.copyfile(next(folder.glob("<*.safetensors")), tmp_path / "outside.safetensors")
    manifest = json.loads((folder / "cdiff_export.json").read_text())
    manifest["tokens"][0]["file"] = name
    (folder / "cdiff_export.json").write_text(json.dumps(manifest))
    expect_failure(["add", "evil", folder, "--base", world["sd2"]], 1, "only files inside", home)


def test_a_lora_manifest_leading_out_through_a_link_is_refused(home, world, tmp_path):
    out = tmp_path / "lora"
    r = runner.invoke(app, ["export", "mycat", "--format", "lora", "-o", str(out)])
    assert r.exit_code == 0, r.output
    secret = tmp_path / "secret"
    secret.mkdir()
    shutil.move(str(out / "mycat.safetensors"), secret / "mycat.safetensors")
    (out / "mycat.safetensors").symlink_to(secret / "mycat.safetensors")
    expect_failure(["add", "evil", out, "--base", world["sd1"], "--token", "<evil>"], 1, "leads out of its folder", home)


def test_a_symlinked_delta_in_the_registry_is_not_followed(home, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    delta = home / "concepts" / "mycat" / "delta.safetensors"
    delta.unlink()
    delta.symlink_to(secret)
    expect_failure(["export", "mycat", "--format", "cdiff", "-o", tmp_path / "out"], 1, "not a regular file", home)
    assert not (tmp_path / "out" / "delta.safetensors").exists()


def test_add_refuses_a_lora_of_rank_zero(home, world, tmp_path):
    """Factors of rank 0 used to divide alpha by zero (`ZeroDivisionError`)."""
    def rank_zero(tensors, meta):
        for k in list(tensors):
            if k.endswith("lora_up.weight"):
                tensors[k] = tensors[k][:, :0].contiguous()
            elif k.endswith("lora_down.weight"):
                tensors[k] = tensors[k][:0].contiguous()

    out = _exported_lora(tmp_path, rank_zero)
    expect_failure(["add", "evil", out, "--base", world["sd1"], "--token", "<evil>"], 1, "factors of shapes", home)
