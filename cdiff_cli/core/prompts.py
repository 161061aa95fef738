"""The method's prompt templates, in one place: training, regularisation, the merge and eval read them here.

The closed-form merge is only right when its constraint rows are the text features of the prompts the
concept was trained on, so the training caption and the merge's constraint prompts are built from the
same template below.
"""

from __future__ import annotations

INSTANCE_TEMPLATE = "photo of a {token} {class_word}"  # target images' caption (the reference's default)
TOKEN_MARK = "{token}"  # where the token goes in a target image's own caption (NAME.txt beside it)
CLASS_TEMPLATE = "photo of a {class_word}"  # generated regularisation images, and eval's forgetting prompt


def instance_prompt(token: str, class_word: str) -> str:
    """The caption of a concept's training images: "photo of a <mycat> cat"."""
    return INSTANCE_TEMPLATE.format(token=token, class_word=class_word)


def class_prompt(class_word: str) -> str:
    """The plain class prompt: regularisation images are generated from it, and eval measures forgetting on it."""
    return CLASS_TEMPLATE.format(class_word=class_word)


def own_caption(text: str, token: str) -> str | None:
    """A target image's own caption with the token in place: `{token}` marks where it goes, or the caption
    holds the token already (any case, as the tokenizer lowercases). None when it holds neither."""
    text = " ".join(text.split())
    if TOKEN_MARK in text:
        return text.replace(TOKEN_MARK, token)
    return text if token.lower() in text.lower() else None


def merge_constraint_prompts(token: str, class_word: str, captions: list[str] = ()) -> list[str]:
    """Prompts whose text features the merged k/v must map as the concept's own delta does: the training
    caption, its bare "<token> class" core, and the target images' own captions when it was trained on
    them (so the merge holds the concept in every sentence it learned it in)."""
    return [f"{token} {class_word}", instance_prompt(token, class_word), *captions]
