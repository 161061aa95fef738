"""cdiff: teach a text-to-image diffusion model new concepts with Custom Diffusion.

The Python API (the same operations and defaults as the `cdiff` commands; see docs/python-api.md):

    import cdiff_cli as cdiff

    reg = cdiff.Registry("./home")                    # Registry() is $CDIFF_HOME, as the CLI uses
    cdiff.train("mycat", "./cat", class_word="cat", registry=reg)
    cdiff.train("mychair", "./chair", class_word="chair", registry=reg)
    cdiff.merge(["mycat", "mychair"], registry=reg)
    images = cdiff.generate("<mycat> cat on a <mychair> chair", n=4, registry=reg)

- train, merge, generate, evaluate, add, export, compress: one function per command;
- Registry and Entry: the store of concepts and one concept in it;
- Concept (joint training), Trained (what train returns);
- errors: CdiffError and its subclasses NotFoundError, BusyError, TrainingStopped (in cdiff_cli.errors);
- StopSignals: `with StopSignals() as stop: train(..., stop=stop)` lets Ctrl-C/SIGTERM stop a run cleanly.

Importing cdiff_cli is light: torch and diffusers load when a function runs.
"""

__version__ = "0.1.0"

from cdiff_cli.api import (  # noqa: E402
    Concept,
    Entry,
    Registry,
    Trained,
    add,
    compress,
    evaluate,
    export,
    generate,
    merge,
    train,
)
from cdiff_cli.errors import BusyError, CdiffError, NotFoundError, TrainingStopped  # noqa: E402
from cdiff_cli.stopping import StopSignals  # noqa: E402

__all__ = ["__version__", "Concept", "Entry", "Registry", "Trained", "add", "compress", "evaluate", "export",
           "generate", "merge", "train", "CdiffError", "NotFoundError", "BusyError", "TrainingStopped", "StopSignals"]
