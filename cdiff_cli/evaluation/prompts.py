"""Evaluation prompts: the shipped prompt set (`data/eval_prompts.json`), a user's prompt file, and
the token-free text that CLIPScore compares images with.

A template holds `{}` for the concept phrase ("TOKEN CLASS", e.g. "<mycat> cat"); pair templates hold
`{0}` and `{1}` for two concepts. Prompt kinds are interleaved (one recontextualisation, one art
style, one added object, one property change, then the next of each), so `--max-prompts 4` already
covers every kind.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from cdiff_cli.errors import CdiffError, option_error

GENERIC = "generic"


@dataclass(frozen=True)
class EvalPrompt:
    prompt: str  # what the concept model is given, with the tokens
    text: str  # the same without the modifier tokens: CLIPScore's text, and the base model's prompt
    kind: str  # recontextualisation, art style, added objects, property change, pair, custom


def to_dict(p: EvalPrompt) -> dict:
    return asdict(p)


@lru_cache(maxsize=1)
def load_prompt_set() -> dict:
    """The shipped prompt set (parsed JSON)."""
    try:
        text = resources.files("cdiff_cli").joinpath("data", "eval_prompts.json").read_text(encoding="utf-8")
    except (FileNotFoundError, OSError) as e:
        raise option_error("the built-in prompt set (cdiff_cli/data/eval_prompts.json) is missing from this "
                           "installation; reinstall cdiff, or give your own with {prompts} FILE", "prompts") from e
    return json.loads(text)


def category_of(class_word: str, prompt_set: dict | None = None) -> str:
    """The prompt category of a class word ("tabby cat" -> pet, "sneakers" -> object); unknown -> generic."""
    ps = prompt_set or load_prompt_set()
    table = {w: name for name, c in ps["categories"].items() for w in c["classes"]}
    word = " ".join(class_word.lower().split())
    candidates = [word]
    if word:
        last = word.split()[-1]
        candidates += [last]
        for w in (word, last):
            if w.endswith("ies"):
                candidates.append(w[:-3] + "y")
            if w.endswith("es"):
                candidates.append(w[:-2])
            if w.endswith("s"):
                candidates.append(w[:-1])
    for c in candidates:
        if c in table:
            return table[c]
    return GENERIC


def concept_phrase(token: str, class_word: str) -> str:
    return f"{token} {class_word}".strip()


_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?'])")


def strip_tokens(prompt: str, tokens: list[str]) -> str:
    """The prompt without the modifier tokens, spaces collapsed:
    "photo of a <mycat> cat on a beach" -> "photo of a cat on a beach". Tokens match case-insensitively,
    as whole words (a token `V1` does not eat the `v1` inside `v10`)."""
    out = prompt
    for t in sorted(tokens, key=len, reverse=True):
        if t:
            out = re.sub(rf"(?<![A-Za-z0-9]){re.escape(t)}(?![A-Za-z0-9])", " ", out, flags=re.IGNORECASE)
    out = " ".join(out.split())
    return _SPACE_BEFORE_PUNCT.sub(r"\1", out)


def interleave(groups: list[list[str]]) -> list[str]:
    """Round-robin over the groups: a0 b0 c0 a1 b1 c1 ..."""
    out = []
    for row in itertools.zip_longest(*groups):
        out.extend(x for x in row if x is not None)
    return out


def _fill(template: str, phrases: list[str]) -> str:
    out = template
    for i, p in enumerate(phrases):
        out = out.replace("{" + str(i) + "}", p)
    return out.replace("{}", " and ".join(phrases))


def builtin_prompts(tokens: list[str], classes: list[str], prompt_set: dict | None = None) -> tuple[list[EvalPrompt], str]:
    """The shipped prompts for an entry. One token: its category's prompts. Several tokens: the pair
    templates, for every pair of tokens. Returns (prompts, a description of the set used)."""
    ps = prompt_set or load_prompt_set()
    classes = list(classes) + [""] * (len(tokens) - len(classes))
    phrases = [concept_phrase(t, c) for t, c in zip(tokens, classes)]
    if len(tokens) == 1:
        cat = category_of(classes[0], ps)
        groups = ps["categories"][cat]["prompts"]
        kinds = ps.get("kinds") or list(groups)
        tagged = interleave([[(k, t) for t in groups[k]] for k in kinds if k in groups])
        prompts = [EvalPrompt(_fill(t, phrases), "", k) for k, t in tagged]
        desc = f"built-in: {cat}"
    else:
        prompts = []
        for i, j in itertools.combinations(range(len(tokens)), 2):
            prompts += [EvalPrompt(_fill(t, [phrases[i], phrases[j]]), "", "pair") for t in ps["pairs"]]
        if len(tokens) > 2:  # interleave the pairs so a limit still covers each of them
            per = len(ps["pairs"])
            chunks = [prompts[k : k + per] for k in range(0, len(prompts), per)]
            prompts = interleave(chunks)
        desc = "built-in: pairs"
    return [EvalPrompt(p.prompt, strip_tokens(p.prompt, tokens), p.kind) for p in prompts], desc


def read_prompt_file(path: str | Path, tokens: list[str], classes: list[str]) -> list[EvalPrompt]:
    """A user's prompts, one per line: `{}` is the concept phrase ("TOKEN CLASS"; all of an entry's
    concepts joined by "and"), `{0}`, `{1}`... one concept each; a line without a placeholder is used
    as it is. Blank lines and lines starting with '#' are skipped."""
    p = Path(path)
    if not p.is_file():
        raise CdiffError(f"prompt file not found: {p}")
    classes = list(classes) + [""] * (len(tokens) - len(classes))
    phrases = [concept_phrase(t, c) for t, c in zip(tokens, classes)]
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for m in re.findall(r"\{(\d+)\}", line):
            if int(m) >= len(phrases):
                raise CdiffError(f"{p}:{n}: {{{m}}} but the entry has only {len(phrases)} concept(s)")
        filled = _fill(line, phrases)
        out.append(EvalPrompt(filled, strip_tokens(filled, tokens), "custom"))
    if not out:
        raise CdiffError(f"no prompts in {p}")
    return out


def select_prompts(tokens: list[str], classes: list[str], *, prompt_file: str | Path | None = None,
                   max_prompts: int | None = None) -> tuple[list[EvalPrompt], str]:
    """The prompts to evaluate an entry with, and a description of where they came from."""
    if not tokens:
        raise CdiffError("this entry has no concept token to evaluate")
    if max_prompts is not None and max_prompts < 1:
        raise option_error("{max_prompts} must be at least 1", "max_prompts")
    if prompt_file is not None:
        prompts, desc = read_prompt_file(prompt_file, tokens, classes), f"file: {prompt_file}"
    else:
        prompts, desc = builtin_prompts(tokens, classes)
    return (prompts[:max_prompts] if max_prompts else prompts), desc


