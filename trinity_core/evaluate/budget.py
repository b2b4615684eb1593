"""What the report may cost: caps on evaluation rows, tokens and time, and the memory each stage used.

A held-out split can be thousands of rows (5% of alpaca-cleaned ≈ 2,600), and each scored row of a
262k-vocabulary model materialises its logits; on a T4 with a 12B model, scoring everything with
five models (base, fine-tuned, merged, two GGUF files) would take hours. So evaluation scores the
first ``max_rows`` rows of the seeded eval split, cut to ``max_tokens`` tokens each, within
``max_seconds`` of wall clock (``ExportSpec.eval_max_rows``, ``eval_max_tokens``, ``eval_max_seconds``).

The time is shared by a :class:`Clock`: each task (a model to score, the generations) may use the
time left divided by the tasks left, so a slow one (an f16 GGUF on CPU) cannot starve the rest, and
time a fast one leaves unused passes on. Each task does at least one row, then stops when its share
is spent; the report says which stopped early and after how many rows.

:class:`Stages` records, per stage, its seconds, the peak GPU memory allocated while it ran
(``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; ``None`` without CUDA) and
the host process's peak RSS so far, so a GPU run shows whether evaluation ever needed more GPU
memory than training did.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from trinity_core import gpu

GIB = 2**30


@dataclass(frozen=True)
class Caps:
    """The defaults are ``ExportSpec``'s."""

    max_rows: int = 64
    max_tokens: int = 512
    max_seconds: float = 900.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Clock:
    """Shares ``max_seconds`` among ``tasks``: :meth:`share` is the next task's deadline."""

    def __init__(self, max_seconds: float, tasks: int, now: Callable[[], float] = time.monotonic):
        self._now = now
        self._end = now() + max_seconds
        self._left = max(tasks, 1)

    def share(self) -> float:
        now = self._now()
        deadline = now + max(0.0, self._end - now) / max(self._left, 1)
        self._left -= 1
        return deadline


@dataclass
class Capped:
    """Iterate ``items``, the first always, the others only while ``now() < deadline``."""

    items: Iterable[Any]
    deadline: float = float("inf")
    now: Callable[[], float] = time.monotonic
    done: int = 0
    stopped_on_time: bool = False

    def __iter__(self) -> Iterator[Any]:
        for item in self.items:
            if self.done and self.now() >= self.deadline:
                self.stopped_on_time = True
                return
            yield item
            self.done += 1


def _host_peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (GIB if sys.platform == "darwin" else 2**20), 3)


@dataclass
class Stages:
    """``with stages("score base"): ...`` records that stage's seconds and memory."""

    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        cuda = gpu.available()
        gpu.reset_peak()
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.stages[name] = {
                "seconds": round(time.monotonic() - t0, 2),
                "gpu_peak_gib": round(gpu.peak_gib(), 3) if cuda else None,
                "host_peak_rss_gib": _host_peak_rss_gib(),
            }

    def summary(self, training_peak_gib: float | None = None) -> dict[str, Any]:
        """``{"device", "gpu_peak_gib", "training_peak_gib", "within_training_peak", "stages"}``."""
        gpu = [s["gpu_peak_gib"] for s in self.stages.values() if s["gpu_peak_gib"] is not None]
        peak = max(gpu) if gpu else None
        within = None if peak is None or not training_peak_gib else peak <= training_peak_gib
        return {"device": "cuda" if gpu else "cpu", "gpu_peak_gib": peak, "training_peak_gib": training_peak_gib,
                "within_training_peak": within, "stages": self.stages}
