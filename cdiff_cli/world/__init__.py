"""The nano world: a procedural world of coloured shapes in which cdiff can show the method work offline.

- `scenes`: the world itself: kinds, colours, fills, sizes, positions and backgrounds, scenes sampled from a
  seed, and their captions;
- `pictures`: drawing scenes, the base world's (image, caption) pairs, a concept's training photos
  (`cdiff_cli.world` gives the names of both, as before);
- `reading`: reads a picture back into its objects (kind, colour, fill, size, position, background);
- `oracle`: parses world prompts and scores readings against them; validates the reading;
- `scores`: prompt following, concept presence and drift of an entry on a nano-world base (`cdiff eval`);
- `demo`: `cdiff demo` and its overview picture.
Dependencies point down that list.
"""

from __future__ import annotations

from cdiff_cli.world.pictures import (
    concept_images,
    dataset,
    grid,
    object_mask,
    pattern_period,
    render,
    save_concept_images,
    shape_mask,
)
from cdiff_cli.world.scenes import (
    BACKGROUNDS,
    CENTRES,
    COLOURS,
    CONCEPT_PAIRS,
    CONCEPTS,
    FILLS,
    KINDS,
    PALETTE,
    POSITIONS,
    PREFIXES,
    RADIUS,
    RADIUS_PAIR,
    RELATIONS,
    SIZES,
    SOLID_ONLY,
    UNNAMED,
    WORDS,
    Concept,
    Mentions,
    ObjectSpec,
    SceneSpec,
    caption,
    concept_pair_specs,
    concept_specs,
    dataset_specs,
    describe,
    pattern_colour,
    sample_object,
    sample_scene,
)

__all__ = [
    "BACKGROUNDS",
    "CENTRES",
    "COLOURS",
    "CONCEPTS",
    "CONCEPT_PAIRS",
    "Concept",
    "FILLS",
    "KINDS",
    "Mentions",
    "ObjectSpec",
    "PALETTE",
    "POSITIONS",
    "PREFIXES",
    "RADIUS",
    "RADIUS_PAIR",
    "RELATIONS",
    "SIZES",
    "SOLID_ONLY",
    "SceneSpec",
    "UNNAMED",
    "WORDS",
    "caption",
    "concept_images",
    "concept_pair_specs",
    "concept_specs",
    "dataset",
    "dataset_specs",
    "describe",
    "grid",
    "object_mask",
    "pattern_colour",
    "pattern_period",
    "render",
    "sample_object",
    "sample_scene",
    "save_concept_images",
    "shape_mask",
]
