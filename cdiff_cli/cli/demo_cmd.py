"""cdiff demo: train, merge, compose and evaluate two concepts offline on the shipped nano model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from cdiff_cli.cli._app import command
from cdiff_cli.cli._options import Device, Json
from cdiff_cli.cli._term import term
from cdiff_cli.defaults import DEMO_STEPS, LIMITS


@command("demo", loads_models=True)
def demo_cmd(
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder (it gets its own registry).")] = Path("cdiff-demo"),
    steps: Annotated[int, typer.Option(min=1, max=LIMITS.steps, help="Training steps per concept.")] = DEMO_STEPS,
    device: Device = "cpu",
    as_json: Json = False,
):
    """Show the method end to end, offline, in a few minutes on a CPU.

    Two particular objects of classes the nano model already draws (a pink square with black stripes and a brown circle: colourings no caption word names) are photographed by cdiff's procedural world, learned as concepts, each constrained by the closed form (its drift on ordinary captions taken back), merged, composed in new scenes and evaluated against the base. An oracle reads the pictures and says how often each concept appears; overview.png shows them.
    """
    from cdiff_cli.world.demo import DemoSettings, run_demo, try_prompt

    t0 = time.perf_counter()
    result = run_demo(out, DemoSettings(steps=steps), device=device, progress=term.progress()).to_dict()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if as_json:
        term.json(result)
        return
    for name, lines in result["sentences"].items():
        for line in lines:
            term.info(f"{name}: {line}")
    for name, sc in result["scores"].items():
        base = sc.get("baseline") or {}
        term.info(f"{name}: image alignment {sc['image_alignment']} (base {base.get('image_alignment')}), "
                  f"text alignment {sc['text_alignment']} (base {base.get('text_alignment')}), KID x1000 {sc['kid']}")
    term.ok(f"demo finished in {result['seconds']} s")
    term.info(f"overview picture: {result['overview']}")
    term.info(f"try it: CDIFF_HOME={result['registry']} cdiff gen \"{try_prompt()}\" --guidance 3 -n 4")
    term.info(f"each concept as trained, before the closed form constrained it: CDIFF_HOME={result['registry']} "
              f"cdiff eval {' '.join(result['trained'])}")
    term.data(result["report_html"])
