"""A job's MLflow run, through MLflow's own client (``mlflow-skinny``, the ``tracking`` extra).

Used by ``tracking.Tracker`` only when the caller passes a tracking URI (the worker takes it from
``TRINITY_MLFLOW_TRACKING_URI``; ``trinity train --mlflow-uri``). One run per job, in the experiment
``trinity``, named after the workdir (the job id under the service): params = the spec flattened
(``lora.r``, ``train.learning_rate``...), metrics = the ``metrics`` events at their step, the report's
held-out losses, and the report, ``result.json`` and the q4_k_m GGUF as artifacts.

The run id is kept in ``workdir/mlflow.json``, so a resumed job continues its run and logs only the
steps after those it already has. A tracking server that fails never fails the job: the first error
becomes one warning event and MLflow is left alone for the rest of the run (MLflow's own HTTP retries,
``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, decide how long that first call waits).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from trinity_core.artifacts import atomic_write_json, read_json

EXPERIMENT = "trinity"
RUN_FILE = "mlflow.json"
MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
CREDENTIALS = re.compile(r"//[^/@\s]+@")  # user:password@ in a URI an error message quotes (events are public)


def flatten(spec: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"lora": {"r": 16}}`` → ``{"lora.r": "16"}``; lists and nulls as JSON."""
    params: dict[str, str] = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            params.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            params[name] = text[:MAX_PARAM_LENGTH]
    return params


class MlflowRun:
    def __init__(self, tracking_uri: str, workdir: Path, emit: Any):
        self.uri = tracking_uri
        self.workdir = workdir
        self.emit = emit
        self.client: Any = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.error: str | None = None
        self.skip_through = 0  # metrics at or below this step are already in the run (resume)
        self.ended = False

    @property
    def active(self) -> bool:
        return self.run_id is not None and self.error is None

    def start(self, spec: dict[str, Any], run_name: str) -> None:
        """Create the run (or reopen the one this workdir already has) and log the spec as params."""
        def start() -> None:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri)
            self.run_id, self.experiment_id = self._reopen() or self._create(run_name)
            atomic_write_json(self.workdir / RUN_FILE, {"run_id": self.run_id, "experiment_id": self.experiment_id})
            params = [Param(k, v) for k, v in flatten(spec).items()]
            for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_PER_BATCH])

        if self._call("start the MLflow run", start, need_run=False):
            self.emit(f"MLflow run {self.run_id} (experiment {self.experiment_id})",
                      mlflow_run_id=self.run_id, mlflow_experiment_id=self.experiment_id)

    def _reopen(self) -> tuple[str, str] | None:
        saved = read_json(self.workdir / RUN_FILE)
        if not saved:
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(saved["run_id"])
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            return None  # the URI now names another server or store: a new run there
        self.client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id, run.info.experiment_id

    def _create(self, run_name: str) -> tuple[str, str]:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(EXPERIMENT)
            except MlflowException:  # another worker created it first
                experiment_id = self.client.get_experiment_by_name(EXPERIMENT).experiment_id
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(experiment_id, run_name=run_name,
                                     tags={"trinity.job_id": run_name, "trinity.workdir": str(self.workdir)})
        return run.info.run_id, experiment_id

    def resumed(self, step: int) -> None:
        """Training resumed from the checkpoint at ``step``: the steps up to it, and those a killed run
        had already logged past it, are in the run; log only the later ones."""
        def history() -> None:
            logged = self.client.get_metric_history(self.run_id, "train/loss")
            self.skip_through = max([step, *(m.step for m in logged)])

        self.skip_through = step
        self._call("read the MLflow run's history", history)

    def restarted(self) -> None:
        """A cheaper rung starts again at step 1 (OOM ladder)."""
        self.skip_through = 0

    def metrics(self, values: dict[str, float], step: int, when: float | None = None, *,
                always: bool = False) -> None:
        """Log ``values`` at ``step``; a step the run already has is skipped unless ``always`` (the
        report's losses at the last step of a job resumed after training had ended)."""
        if not self.active or (step <= self.skip_through and not always):
            return
        from mlflow.entities import Metric

        stamp = int((when or time.time()) * 1000)
        batch = [Metric(key, float(value), stamp, step) for key, value in values.items()]
        self._call("log metrics to MLflow", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, v) for k, v in tags.items()]
        self._call("tag the MLflow run", lambda: self.client.log_batch(self.run_id, tags=batch))

    def artifacts(self, files: list[tuple[str, Path]]) -> None:
        """``(artifact folder, local file)`` pairs, uploaded in order; a missing file is skipped."""
        for folder, path in files:
            if path.is_file():
                done = self._call(f"upload {path.name} to MLflow",
                                  lambda p=path, f=folder: self.client.log_artifact(self.run_id, str(p), f or None))
                if not done:
                    return

    def end(self, status: str) -> None:
        """FINISHED, FAILED or KILLED (cancelled). A failed job that is retried reopens the run."""
        if self.active and not self.ended:
            self.ended = True
            self._call("end the MLflow run", lambda: self.client.set_terminated(self.run_id, status))

    def _call(self, what: str, fn: Any, *, need_run: bool = True) -> bool:
        """Run one MLflow call; the first failure is a warning and switches MLflow off for this run."""
        if self.error is not None or (need_run and self.run_id is None):
            return False
        try:
            fn()
        except Exception as error:  # any failure of the tracking server or its client: the job goes on
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            self.error = CREDENTIALS.sub("//***@", f"{type(error).__name__}: {first_line}")
            self.emit.warning(f"MLflow tracking stopped: could not {what} ({self.error}); the job continues",
                              mlflow_error=self.error)
            return False
        return True
