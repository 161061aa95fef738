"""The method's prompt templates, in one place: training, regularisation, the merge and eval read them here.

The closed-form merge is only right when its constraint rows are the text features of the prompts the
concept was trained on, so the training caption and the merge's constraint prompts are built from the
same template below.
"""

from __future__ import annotations

INSTANCE_TEMPLATE = "photo of a {token} {class_word}"  # target images' caption (the reference's default)
CLASS_TEMPLATE = "photo of a {class_word}"  # generated regularisation images, and eval's forgetting prompt


def instance_prompt(token: str, class_word: str) -> str:
    """The caption of a concept's training images: "photo of a <mycat> cat"."""
    return INSTANCE_TEMPLATE.format(token=token, class_word=class_word)


def class_prompt(class_word: str) -> str:
    """The plain class prompt: regularisation images are generated from it, and eval measures forgetting on it."""
    return CLASS_TEMPLATE.format(class_word=class_word)


def merge_constraint_prompts(token: str, class_word: str) -> list[str]:
    """Prompts whose text features the merged k/v must map as the concept's own delta does: the training
    caption and its bare "<token> class" core."""
    return [f"{token} {class_word}", instance_prompt(token, class_word)]
