"""Experiment tracking fed from the job's own events: TensorBoard always, MLflow when asked.

A :class:`Tracker` sits beside the caller's ``on_event`` (``Tracker.tee``) and turns each
``metrics`` event (``trinity_core.events``) into scalars at its ``step``; ``finish`` adds the
held-out losses of the report at the last step. Training code knows nothing of it.

TensorBoard event files go to ``workdir/tensorboard/`` (an artifact: ``artifacts.build_manifest``).
Scalars: ``train/loss``, ``train/learning_rate``, ``train/grad_norm``, ``train/peak_mem_gib``,
``train/tokens_per_s``, ``eval/loss`` when an event carries ``eval_loss``, and
``eval/<model>_loss`` (base, fine-tuned, merged, GGUF...) from the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trinity_core.events import Event, OnEvent

TENSORBOARD_DIR = "tensorboard"
# metrics event field -> scalar tag
SCALARS = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
           "peak_mem_gib": "train/peak_mem_gib", "tokens_per_s": "train/tokens_per_s", "eval_loss": "eval/loss"}


class Tracker:
    """Writes a job's metrics events as TensorBoard scalars under ``workdir/tensorboard``. The writer
    (and torch.utils.tensorboard) is opened at the first metrics event: a job that fails before
    training leaves no event file, and nothing is imported before the training backend is chosen."""

    def __init__(self, workdir: str | Path):
        self.log_dir = Path(workdir) / TENSORBOARD_DIR
        self.writer: Any = None
        self.last_step = 0

    def tee(self, on_event: OnEvent | None) -> OnEvent:
        """An ``on_event`` that records the event, then hands it to ``on_event``."""
        def both(event: Event) -> None:
            self.on_event(event)
            if on_event is not None:
                on_event(event)
        return both

    def on_event(self, event: Event) -> None:
        data = event.data or {}
        if event.type != "metrics" or not isinstance(data.get("step"), int):
            return
        self.last_step = max(self.last_step, data["step"])
        for field, tag in SCALARS.items():
            if isinstance(data.get(field), (int, float)):
                self._scalar(tag, data[field], data["step"], event.time)

    def finish(self, report: dict[str, Any] | None = None) -> None:
        """The report's held-out losses at the last step, then the files closed (before the manifest
        hashes them)."""
        for name, scores in ((report or {}).get("models") or {}).items():
            if isinstance(scores, dict) and isinstance(scores.get("loss"), (int, float)):
                self._scalar(f"eval/{name}_loss", scores["loss"], self.last_step)
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _scalar(self, tag: str, value: float, step: int, walltime: float | None = None) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.writer.add_scalar(tag, float(value), step, walltime=walltime)
