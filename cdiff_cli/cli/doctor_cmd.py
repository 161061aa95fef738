"""cdiff doctor: check the registry and repair it."""

from __future__ import annotations

from typing import Annotated

import typer

from cdiff_cli.cli._app import command
from cdiff_cli.cli._options import Json, registry
from cdiff_cli.cli._term import term


@command("doctor")
def doctor_cmd(
    fix: Annotated[bool, typer.Option("--fix", help="Repair what was found: delete leftovers of killed writes, "
                                                    "move damaged entries to HOME/quarantine/.")] = False,
    discard_checkpoints: Annotated[bool, typer.Option("--discard-checkpoints", help="With --fix, also delete the "
                                                      "checkpoints of unfinished training runs (they are not damage: "
                                                      "`cdiff train ... --resume` continues them).")] = False,
    as_json: Json = False,
):
    """Check the registry for damage and leftovers; repair it with --fix.

    Finds leftovers of killed writes, entries without manifest or delta, damaged manifests, and deltas that do not match their content hash. It also lists the checkpoints of unfinished training runs (resumable with `cdiff train ... --resume`) and manifests written by an older cdiff (`--fix` rewrites them in the current schema); neither is a problem.

    Damaged entries are never deleted: --fix moves them to HOME/quarantine/NAME-<UTC time>/. Concepts that another cdiff process is using are not touched.

    Exit code: 0 healthy (or everything found was fixed), 1 problems remain, 3 some concepts were busy and could not be checked.
    """
    from cdiff_cli.registry.doctor import check, exit_code

    reg = registry()
    findings = check(reg, fix=fix, discard_checkpoints=discard_checkpoints)
    code = exit_code(findings)
    if as_json:
        term.json([f.to_dict() for f in findings])
    elif findings:
        rows = []
        for f in findings:
            where = f.name or f.path
            if f.fixed:
                state = {"delete": "deleted", "restore": "restored", "quarantine": f"moved to {f.moved_to}",
                         "migrate": "rewritten"}[f.action]
            else:
                state = f"--fix: {f.action}" if f.fixable else "-"
            rows.append([f.kind, where, f.detail, state])
        term.table(["PROBLEM", "NAME", "DETAIL", "FIX"], rows)
    # An unfinished run's checkpoint is not damage, nor is a manifest an older cdiff wrote.
    problems = [f for f in findings if f.kind not in ("checkpoint", "old-schema")]
    if not problems:
        n = len(reg.entries())
        term.ok(f"the registry is healthy ({n} concept{'s' if n != 1 else ''}, {reg.home})")
    elif code == 0:
        term.ok(f"fixed {len(problems)} problem{'s' if len(problems) != 1 else ''}")
    elif code == 1 and not fix:
        term.info("run `cdiff doctor --fix` to repair: damaged entries go to the quarantine folder, leftovers are deleted")
    elif code == 3:
        term.warn("some concepts are in use by another cdiff process: run `cdiff doctor` again when it is done")
    raise typer.Exit(code)
