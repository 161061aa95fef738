"""The one exception type the CLI turns into a single clear line on stderr."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's text (libraries' messages run over many lines), else
    its type's name: for one-line error messages."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def reason(e: BaseException) -> str:
    """Like `first_line`, but the system's own words for an OSError (disk full, permission denied)."""
    return e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)


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
