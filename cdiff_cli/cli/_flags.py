"""The engine names options by their Python API names (`cdiff_cli.errors.Message`); the CLI says them as flags."""

from __future__ import annotations

from cdiff_cli.errors import Message

# The flags of options whose flag is not `--` + their API name with dashes.
FLAGS = {"n": "-n", "class_word": "--class", "classes": "--class", "tokens": "--token", "embeddings": "--embedding",
         "sample_prompts": "--sample", "samples": "--no-samples", "out": "-o"}


def flag(option: str) -> str:
    """The command-line flag of an option the engine names by its API name."""
    return FLAGS.get(option, "--" + option.replace("_", "-"))


def in_flags(message: str | Message) -> str:
    """A message from the engine as the CLI says it."""
    return message.render(flag) if isinstance(message, Message) else message
