"""Ctrl-C and SIGTERM as a request to stop training cleanly: a context manager the CLI enters (the engine
installs no signal handler; it only reads the `requested` flag of what it is given, see `train_entry`)."""

from __future__ import annotations

import signal
import threading


class StopSignals:
    """Within `with StopSignals() as stop:`, the first SIGINT/SIGTERM sets `stop.requested`; a second
    SIGINT raises KeyboardInterrupt at once. Signal handlers can only be installed from the main
    thread: elsewhere this does nothing and signals behave as usual."""

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
