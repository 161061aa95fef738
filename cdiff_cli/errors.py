"""The one exception type the CLI turns into a single clear line on stderr."""


class CdiffError(Exception):
    """A problem the user can fix (bad input, missing file, mismatched base...)."""

    exit_code = 1


class NotFoundError(CdiffError):
    """A named registry entry, token or file does not exist."""

    exit_code = 2


class TrainingStopped(CdiffError):
    """Training stopped by Ctrl-C or SIGTERM after saving a checkpoint (resume with --resume)."""

    exit_code = 130


class BusyError(CdiffError):
    """Another cdiff process holds the lock of a concept (training it, writing or reading it)."""

    exit_code = 3
