"""Experiment tracking fed from the job's own events: TensorBoard always, MLflow when asked.

A :class:`Tracker` sits beside the caller's ``on_event`` (``Tracker.tee``) and turns each
``metrics`` and ``eval`` event (``trinity_core.events``) into scalars at its ``step``; ``finish`` adds the
held-out losses of the report at the last step. Training code knows nothing of it.

TensorBoard event files go to ``workdir/tensorboard/`` (an artifact: ``artifacts.build_manifest``).
Scalars: ``train/loss``, ``train/learning_rate``, ``train/grad_norm``, ``train/peak_mem_gib``,
``train/tokens_per_s``, ``eval/loss`` from the events that carry ``eval_loss``, and
``eval/<model>_loss`` (base, fine-tuned, merged, GGUF...) from the report.

A run that trains again over steps an earlier process already wrote (resumed from a checkpoint
older than the kill, or a cheaper rung of the OOM ladder starting at step 1) opens its writer with
``purge_step`` = its first step: TensorBoard then drops the stale points at and after that step.

With a tracking URI the same scalars also go to MLflow (``tracking_mlflow.MlflowRun``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trinity_core.events import Event, OnEvent

TENSORBOARD_DIR = "tensorboard"
# metrics event field -> scalar tag
SCALARS = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
           "peak_mem_gib": "train/peak_mem_gib", "tokens_per_s": "train/tokens_per_s", "eval_loss": "eval/loss"}


class Tracker:
    """Writes a job's metrics events as TensorBoard scalars under ``workdir/tensorboard`` (and to MLflow
    when ``mlflow_uri`` is given). The writer (and torch.utils.tensorboard) is opened at the first
    metrics event: a job that fails before training leaves no event file, and nothing is imported
    before the training backend is chosen."""

    def __init__(self, workdir: str | Path, mlflow_uri: str | None = None):
        self.workdir = Path(workdir)
        self.log_dir = self.workdir / TENSORBOARD_DIR
        self.mlflow_uri = mlflow_uri
        self.mlflow: Any = None  # tracking_mlflow.MlflowRun, from start()
        self.writer: Any = None
        self.last_step = 0
        self.purge_from: int | None = None  # the first step this process trains, when earlier files may have it

    def start(self, spec: dict[str, Any], emit: Any) -> None:
        """Open the MLflow run (when there is a URI) with the spec as params; ``emit`` carries its
        warnings. Imports mlflow only here."""
        if self.mlflow_uri:
            from trinity_core.tracking_mlflow import MlflowRun

            self.mlflow = MlflowRun(self.mlflow_uri, self.workdir, emit)
            self.mlflow.start(spec, run_name=self.workdir.name)

    def info(self) -> dict[str, Any]:
        """For the job's result: where its tracking went."""
        info: dict[str, Any] = {"tensorboard": TENSORBOARD_DIR}
        if self.mlflow is not None:
            info.update(mlflow_run_id=self.mlflow.run_id, mlflow_experiment_id=self.mlflow.experiment_id,
                        mlflow_error=self.mlflow.error)
        return info

    def tee(self, on_event: OnEvent | None) -> OnEvent:
        """An ``on_event`` that hands the event to ``on_event``, then records it (so a tracking warning
        raised while recording arrives after the event it is about)."""
        def both(event: Event) -> None:
            if on_event is not None:
                on_event(event)
            self.on_event(event)
        return both

    def on_event(self, event: Event) -> None:
        data = event.data or {}
        if isinstance(data.get("resumed_from"), int):  # training continues after this checkpoint's step
            self.last_step = data["resumed_from"]
            self.purge_from = data["resumed_from"] + 1
            if self.mlflow is not None:
                self.mlflow.resumed(data["resumed_from"])
            return
        if event.level == "warning" and "rung" in data and "settings" in data:  # OOM ladder: a new rung, step 1
            self.close()  # the next metrics event reopens the writer, purging the failed rung's steps
            self.last_step = 0
            self.purge_from = 1
            if self.mlflow is not None:
                self.mlflow.restarted()
            return
        if event.type not in ("metrics", "eval") or not isinstance(data.get("step"), int):
            return
        step = data["step"]
        self.last_step = max(self.last_step, step)
        values = {tag: data[field] for field, tag in SCALARS.items() if isinstance(data.get(field), (int, float))}
        for tag, value in values.items():
            self._scalar(tag, value, step, event.time)
        if self.mlflow is not None:
            self.mlflow.metrics(values, step, event.time)

    def finish(self, report: dict[str, Any] | None = None) -> None:
        """The report's held-out losses at the last step, then the files closed (before the manifest
        hashes them)."""
        losses = {f"eval/{name}_loss": scores["loss"] for name, scores in ((report or {}).get("models") or {}).items()
                  if isinstance(scores, dict) and isinstance(scores.get("loss"), (int, float))}
        for tag, loss in losses.items():
            self._scalar(tag, loss, self.last_step)
        if self.mlflow is not None and losses:
            self.mlflow.metrics(losses, self.last_step, always=True)
        self.close()

    def upload(self, result: dict[str, Any]) -> None:
        """MLflow only: the rung the job ran on as tags, the report, ``result.json`` and the q4_k_m GGUF
        (or the first quantisation) as artifacts."""
        if self.mlflow is None:
            return
        self.mlflow.tags({"trinity.rung": str(result.get("final_rung")), "trinity.rung_settings": json.dumps(result.get("final_settings"))})
        gguf = (result.get("export") or {}).get("gguf") or {}
        chosen = gguf.get("q4_k_m") or next(iter(gguf.values()), None)
        report = self.workdir / "report"
        files = [("report", report / "report.json"), ("report", report / "report.md"), ("report", report / "loss.png"),
                 ("", self.workdir / "result.json")]
        if chosen:
            files.append(("gguf", self.workdir / chosen))
        self.mlflow.artifacts(files)

    def close(self, mlflow_status: str | None = None) -> None:
        """Close the TensorBoard writer; with ``mlflow_status`` (FINISHED, FAILED, KILLED) also end the
        MLflow run."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if mlflow_status and self.mlflow is not None:
            self.mlflow.end(mlflow_status)

    def _scalar(self, tag: str, value: float, step: int, walltime: float | None = None) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # Event files already here come from an earlier process (killed, or its rung failed): what
            # they hold from the step this process trains first on is stale. Only a training event
            # purges (walltime given), not the report's losses of a job resumed after training ended.
            stale = walltime is not None and self.log_dir.is_dir() and any(self.log_dir.iterdir())
            purge = (self.purge_from or step) if stale else None
            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)
        self.writer.add_scalar(tag, float(value), step, walltime=walltime)
