"""Merging concepts: the paper's closed-form constrained merge of several deltas (`closed_form`), regularised
by the text features of ordinary captions (`captions`, shipped in `data/captions.txt`); `entries` merges
registry entries into a new one (`cdiff merge`).
"""

from __future__ import annotations

from cdiff_cli.merging.closed_form import (
    DEFAULT_RIDGE,
    concept_prompts,
    constrain_delta,
    constrained_merge,
    constraint_residual,
    dedupe_rows,
    duplicate_groups,
    gram,
    merge_deltas,
    prompt_features,
    regulariser_gram,
)

__all__ = ["DEFAULT_RIDGE", "concept_prompts", "constrain_delta", "constrained_merge", "constraint_residual", "dedupe_rows",
           "duplicate_groups", "gram", "merge_deltas", "prompt_features", "regulariser_gram"]
