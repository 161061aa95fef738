"""docs/cli.md is generated from the Typer app; it must match the app as it is now."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cli_reference_is_current():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = gen.render()
    for command in ("train", "merge", "compress", "gen", "eval", "add", "export", "list", "show", "rm", "path",
                    "doctor", "demo"):
        assert f"## `cdiff {command}`" in text
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == text, \
        "docs/cli.md is stale: run python scripts/gen_cli_docs.py"
