"""`cdiff eval`: what a concept does to the base's pictures, in the paper's metrics.

- `run`: the evaluation itself (`evaluate_entries`): generate with the concept and with the base, score,
  store a summary in each entry's manifest;
- `plan`: what it will do (`EvalSettings`, checked; per entry its prompts, class prompts and image sources);
- `scoring`: features, alignment, forgetting, the oracle's reading on a nano-world base, the manifest summary;
- `results`: the contract of the results (`EvalRun`, `EntryResult`, `ManifestMetrics`: typed dictionaries);
- `prompts`: the shipped prompt set (CustomConcept101-style), a user's prompt file, token stripping;
- `metrics`: the pure score functions (CLIPScore text alignment, image alignment, KID);
- `features`: loading CLIP and DINO (hub ids, local folders, or the shipped nano CLIP);
- `report`: the HTML and JSON report.
"""

from __future__ import annotations

from cdiff_cli.evaluation.plan import EvalSettings, concept_sources
from cdiff_cli.evaluation.results import EntryResult, EvalRun, ManifestMetrics
from cdiff_cli.evaluation.run import evaluate_entries
from cdiff_cli.evaluation.scoring import manifest_metrics

__all__ = ["EntryResult", "EvalRun", "EvalSettings", "ManifestMetrics", "concept_sources", "evaluate_entries",
           "manifest_metrics"]
