"""The job status machine (OpenAI's fine-tuning states, plus ``cancelling``).

```
validating_files ─► queued ─► running ─► succeeded
        │             │  ▲       │  └──► failed
        │             │  └───────┤  (re-queued: worker lost, or a retryable error)
        ▼             ▼          ▼
     failed      cancelled   cancelling ─► cancelled | failed | succeeded
```

``TRANSITIONS`` is the one table of legal moves; ``crud.transition`` enforces it inside the
UPDATE (``WHERE status IN sources(to)``), so a race between two writers cannot break it.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    validating_files = "validating_files"
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


S = JobStatus
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.validating_files: frozenset({S.queued, S.failed, S.cancelled}),
    S.queued: frozenset({S.running, S.cancelled, S.failed}),
    # running -> queued: the reaper found a dead worker, or a retryable error; the job resumes.
    S.running: frozenset({S.succeeded, S.failed, S.cancelling, S.queued}),
    # cancelling -> succeeded: the flag came during export, after the last step boundary.
    S.cancelling: frozenset({S.cancelled, S.failed, S.succeeded}),
    S.succeeded: frozenset(),
    S.failed: frozenset(),
    S.cancelled: frozenset(),
}
TERMINAL = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)
ACTIVE = frozenset({S.running, S.cancelling})  # a worker holds the job: it has a heartbeat


class IllegalTransition(Exception):
    def __init__(self, current: JobStatus | str | None, target: JobStatus | str):
        self.current, self.target = current, target
        super().__init__(f"cannot move a job from {_name(current)} to {_name(target)}")


def _name(status: JobStatus | str | None) -> str:
    return status.value if isinstance(status, JobStatus) else str(status)


def can_transition(current: JobStatus | str, target: JobStatus | str) -> bool:
    return JobStatus(target) in TRANSITIONS[JobStatus(current)]


def check_transition(current: JobStatus | str, target: JobStatus | str) -> None:
    """Raise ``IllegalTransition`` unless ``current -> target`` is in the table."""
    if not can_transition(current, target):
        raise IllegalTransition(current, target)


def sources(target: JobStatus | str) -> frozenset[JobStatus]:
    """Every status that may move to ``target``."""
    target = JobStatus(target)
    return frozenset(s for s, nxt in TRANSITIONS.items() if target in nxt)


def is_terminal(status: JobStatus | str) -> bool:
    return JobStatus(status) in TERMINAL
