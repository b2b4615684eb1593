"""One event shape from run_job to the SSE stream.

``{seq, time, level: info|warning|error, type: message|metrics|eval|status|ladder, message, data}``.
``metrics`` data carries step, total_steps, loss, lr, grad_norm, tokens_per_s, peak_mem_gib, eta_s;
``eval`` (the held-out loss during training, :mod:`trinity_core.train.eval_loop`) carries step,
total_steps, eval_loss, rows, tokens, seconds, best_step, best_eval_loss;
``status`` data carries the stage or job state; ``ladder`` data carries the OOM ladder's whole
attempt list (``attempts``), and ``rung`` + ``settings`` when an attempt starts (a downgrade is a
``warning``; ``train/ladder.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Level = Literal["info", "warning", "error"]
Kind = Literal["message", "metrics", "eval", "status", "ladder"]


@dataclass
class Event:
    seq: int
    time: float
    level: Level
    type: Kind
    message: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


OnEvent = Callable[[Event], None]


class Emitter:
    """Numbers events monotonically and hands them to ``on_event``.

    ``start_seq`` lets a resumed job continue the sequence it had before.
    """

    def __init__(self, on_event: OnEvent | None = None, start_seq: int = 0):
        self._on_event = on_event
        self.seq = start_seq

    def __call__(self, message: str, *, level: Level = "info", type: Kind = "message", **data: Any) -> Event:
        self.seq += 1
        event = Event(self.seq, time.time(), level, type, message, data)
        if self._on_event is not None:
            self._on_event(event)
        return event

    def metrics(self, message: str, **data: Any) -> Event:
        return self(message, type="metrics", **data)

    def eval(self, message: str, **data: Any) -> Event:
        return self(message, type="eval", **data)

    def status(self, message: str, **data: Any) -> Event:
        return self(message, type="status", **data)

    def warning(self, message: str, **data: Any) -> Event:
        return self(message, level="warning", **data)
