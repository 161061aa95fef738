"""Property tests: prompt and concept-spec parsing never fail on any text, and no file, however damaged
or hand-crafted, makes delta reading fail with anything but a clear CdiffError."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cdiff_cli.core.delta import Delta
from cdiff_cli.core.tokens import angle_tokens, find_tokens, validate_token
from cdiff_cli.errors import CdiffError
from cdiff_cli.formats import load_delta_file
from cdiff_cli.training.entry import parse_concept

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


# -- prompts, tokens, concept specs --------------------------------------------------------------


@FUZZ
@given(st.text(max_size=200), st.lists(st.text(min_size=1, max_size=12), max_size=4))
def test_prompt_parsing_never_fails(prompt, known):
    for t in angle_tokens(prompt):
        assert t in prompt and t.startswith("<") and t.endswith(">") and not any(c.isspace() for c in t)
    found = find_tokens(prompt, known)
    assert all(t in known and t.lower() in prompt.lower() for t in found)


KNOWN = ["<mycat>", "v1", "sksx1", "<a.b>"]


@FUZZ
@given(st.text(max_size=60))
def test_a_prompt_without_a_registry_token_resolves_no_concept(prompt):
    assume(not any(k in prompt.lower() for k in KNOWN))
    assert find_tokens(prompt, KNOWN) == []


@FUZZ
@given(st.text(max_size=8), st.sampled_from(KNOWN), st.text(max_size=8))
def test_a_token_counts_only_as_a_word_of_its_own(before, token, after):
    """As the tokenizer splits tokens added as single words: "v1" is not in "v10" or "cv1"."""
    prompt = before + token.upper() + after
    alone = not (before[-1:].isalnum() or before[-1:] == "_") and not (after[:1].isalnum() or after[:1] == "_")
    if alone:
        assert token in find_tokens(prompt, KNOWN)
    elif not any(k in (before + after).lower() for k in KNOWN):
        assert token not in find_tokens(prompt, KNOWN)


@FUZZ
@given(st.one_of(st.text(max_size=50), st.from_regex(r"<[a-z0-9_-]{1,12}>", fullmatch=True)))
def test_a_token_is_refused_clearly_or_is_one_prompt_word(token):
    try:
        out = validate_token(token)
    except CdiffError as e:
        assert "\n" not in str(e)
        return
    assert out == token and token and not any(c.isspace() for c in token) and "," not in token
    assert token.isascii() and token.isprintable() and any(c.isalnum() for c in token) and "<|" not in token


@FUZZ
@given(st.text(max_size=80))
def test_concept_spec_parses_or_is_refused(spec):
    try:
        c = parse_concept(spec)
    except CdiffError:
        return
    assert spec == f"{c.token}:{c.class_word}:{c.images_dir}" or spec.startswith(f"{c.token}:{c.class_word}:")


# -- delta files -----------------------------------------------------------------------------------


def _valid_delta_bytes() -> bytes:
    d = Delta({"down.attn2.to_k.weight": torch.arange(12.0).reshape(3, 4), "down.attn2.to_v.weight": torch.ones(3, 4)},
              ["<f1>"], torch.full((1, 4), 0.5))
    with tempfile.TemporaryDirectory() as tmp:
        d.save(Path(tmp) / "delta.safetensors")
        return (Path(tmp) / "delta.safetensors").read_bytes()


VALID = _valid_delta_bytes()


def _read(data: bytes) -> None:
    """Both readers (the registry's and the importer's): a Delta or a CdiffError, nothing else."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "delta.safetensors"
        path.write_bytes(data)
        for read in (Delta.load, load_delta_file):
            try:
                d = read(path)
            except CdiffError as e:
                assert str(e).strip(), "an empty message"
                continue
            assert isinstance(d, Delta) and d.tokens


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(1, len(VALID)))
def test_damaged_delta_files_read_or_fail_clearly(flips, keep):
    data = bytearray(VALID[:keep])
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    _read(bytes(data))


tensor_entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "XX", ""]),
    "shape": st.lists(st.integers(-2, 1 << 40), max_size=4),
    "data_offsets": st.lists(st.integers(-1, 1 << 40), min_size=0, max_size=3),
})
header = st.dictionaries(
    st.sampled_from(["unet.a.attn2.to_k.weight", "unet.a.attn2.to_v.weight", "text.token_embeddings", "x"]),
    tensor_entry, max_size=3,
).map(lambda h: {**h, "__metadata__": {"format": "cdiff-delta", "version": "1", "tokens": '["<f1>"]', "mode": "kv"}})


@FUZZ
@given(header, st.binary(max_size=64), st.booleans())
def test_crafted_safetensors_headers_read_or_fail_clearly(head, body, lie_about_length):
    raw = json.dumps(head).encode()
    length = len(raw) + (1 << 30 if lie_about_length else 0)
    _read(struct.pack("<Q", length) + raw + body)


def test_the_valid_file_reads():
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "d.safetensors").write_bytes(VALID)
        d = Delta.load(Path(tmp) / "d.safetensors")
    assert d.tokens == ["<f1>"] and torch.equal(d.weights["down.attn2.to_k.weight"], torch.arange(12.0).reshape(3, 4))
