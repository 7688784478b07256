"""Errors `rlhf` turns into one line and a non-zero exit."""
from collections.abc import Iterator
from contextlib import contextmanager


class UsageError(RuntimeError):
    """A problem the user can fix (a path, a port, an address), phrased as one line."""


class JobFailed(RuntimeError):
    """The job stopped on a failure it cannot recover from (learner crash, reward errors);
    the message names the cause and the resume command."""


class Stopped(KeyboardInterrupt):
    """SIGTERM (kill, Kubernetes, Slurm, docker stop) to a command with no run to keep: it unwinds like
    Ctrl-C (every `finally` runs, nothing half written stays) and exits 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def raise_stopped(signum: int, frame) -> None:
    """A signal handler: SIGTERM becomes `Stopped` in the main thread."""
    raise Stopped(signum)


def one_line(e: BaseException) -> str:
    """`Type: last non-empty line of the message`, the part of a remote traceback that says why."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300]


@contextmanager
def failing_as(what: str) -> Iterator[None]:
    """Any failure inside (a dead learner rank, a reward service that gave up after its retries)
    ends the job as one JobFailed line that says which stage of which step it hit."""
    try:
        yield
    except JobFailed:
        raise
    except Exception as e:  # noqa: BLE001 - the callee already retried what could be retried
        raise JobFailed(f"{what}: {one_line(e)}") from None
