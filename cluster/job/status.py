"""`JobStatus`: what the controller reports about a running job, one typed object read by
`rlhf train`'s progress bar and summary, and by `rlhf status`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Phase = Literal["created", "starting", "running", "stopping", "done", "failed"]


@dataclass(frozen=True)
class JobStatus:
    name: str
    phase: Phase                    # "stopping": services stopping; "done"/"failed" only once they are
    error: str | None               # one line, when the job failed
    run_dir: str
    step: int                       # steps finished (the next step's index)
    steps: int                      # loop.steps
    mode: str                       # loop.mode: sync | async
    policy_version: int             # the learner's weights version
    num_workers: int                # rollout workers now
    worker_ids: list[str]
    samples_per_s: float            # of the last step
    tokens_per_s: float             # rollout tokens/s of the last step
    first: dict | None              # the first step's metrics row (this run's, or the resumed run's)
    last: dict                      # the last step's metrics row, with its "step"
    latest_checkpoint: str | None
    uptime_s: float
    review_url: str | None          # the reward app's review page, when it has one
    review_sign_in: str | None      # how to open it (where the token is; never the token)
    messages: list[str] = field(default_factory=list)  # the controller's log lines from the index asked for
    num_messages: int = 0           # log lines so far (the next call's `messages_from`)

    @property
    def ended(self) -> bool:
        return self.phase in ("done", "failed")
