"""Errors `rlhf` turns into one line and a non-zero exit."""


class UsageError(RuntimeError):
    """A problem the user can fix (a path, a port, an address), phrased as one line."""


class JobFailed(RuntimeError):
    """The job stopped on a failure it cannot recover from (learner crash, reward errors);
    the message names the cause and the resume command."""


def one_line(e: BaseException) -> str:
    """`Type: last non-empty line of the message`, the part of a remote traceback that says why."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300]
