"""One process of a data-parallel training run, for tests/test_distributed.py to start under
`accelerate launch`: trains `cat` into the registry at HOME, optionally sending itself SIGINT (a Ctrl-C
that reaches this process only) when its training bar reaches a step, or resuming.

    accelerate launch ... tests/dist_worker.py HOME BASE IMAGES [--stop-rank R --stop-at N] [--resume]
"""

import argparse
import os
import signal
import sys
from contextlib import contextmanager

from cdiff_cli.errors import CdiffError
from cdiff_cli.progress import SILENT, Progress, Task
from cdiff_cli.registry import Registry
from cdiff_cli.stopping import StopSignals
from cdiff_cli.training import TrainConfig
from cdiff_cli.training.entry import ConceptSpec, RegOptions, train_entry


class SignalAt(Progress):
    """Sends this process SIGINT when the training bar reaches `at` steps (a Ctrl-C mid-run); also used
    by tests/test_resume.py."""

    def __init__(self, at: int):
        self.at = at

    @contextmanager
    def task(self, description, total):
        at = self.at if description == "training" else None

        class _T(Task):
            count = 0

            def advance(self, n=1, **fields):
                self.count += n
                if self.count == at:
                    os.kill(os.getpid(), signal.SIGINT)

        yield _T()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("home")
    ap.add_argument("base")
    ap.add_argument("images")
    ap.add_argument("--stop-rank", type=int, default=-1)
    ap.add_argument("--stop-at", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    cfg = TrainConfig(steps=6, batch_size=2, lr=1e-3, resolution=64, aug_pool=2, precision="fp32")
    progress = SILENT
    if rank == a.stop_rank:
        progress = SignalAt(a.stop_at)
        if rank != 0:  # secondary processes report nothing: hook the progress they are given instead
            import cdiff_cli.training.entry

            cdiff_cli.training.entry.SILENT = progress
    try:
        with StopSignals() as stop:  # as `cdiff train` does: a SIGINT asks the run to stop
            entry, result = train_entry(Registry(a.home), "cat", [ConceptSpec("<cat>", "cat", a.images)], cfg,
                                        base=a.base, reg=RegOptions("generated", None, 2), device="cpu",
                                        checkpoint_every=0, resume=a.resume, stop=stop, progress=progress)
    except CdiffError as e:
        sys.stderr.write(f"rank {rank}: {e}\n")
        return e.exit_code
    # One write with its newline: print() writes the text and the newline apart when stdout is unbuffered
    # (PYTHONUNBUFFERED=1), and the two processes' lines then run into each other on the shared pipe.
    sys.stdout.write(f"rank {rank}: trained, {result.processes} processes, losses {result.losses}\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
