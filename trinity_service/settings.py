"""Service settings: one ``Settings`` read from ``TRINITY_*`` environment variables.

Development defaults run on a laptop (SQLite file and uploads under ``./.trinity``, Redis on
loopback or the embedded broker). ``TRINITY_ENV=production`` refuses the defaults that are only
safe on a developer's machine.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from trinity_core.options import RunOptions

DEFAULT_DATA_DIR = Path(".trinity")
LOOPBACK = {"127.0.0.1", "localhost", "::1", None, ""}


def _split(value: object) -> object:
    """Comma-separated env values (``gpu.default,gpu.t4``) become lists."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class GpuClass(BaseModel):
    """The GPU behind a queue, as the API's routing sees it (``api/routing.py``)."""

    gib: float = Field(gt=0, le=4096, description="GPU memory a job may use, in GiB (a T4: 15.1)")
    bf16: bool = Field(False, description="The GPU computes in bf16 (Ampere and newer; a T4 does not)")


def _gpu_classes(value: object) -> object:
    """``gpu.t4=15.1,gpu.a100=79:bf16`` → ``{"gpu.t4": {"gib": 15.1}, "gpu.a100": {"gib": 79, "bf16": True}}``."""
    if not isinstance(value, str):
        return value
    out: dict[str, dict[str, object]] = {}
    for entry in _split(value):
        name, eq, size = entry.partition("=")
        gib, _, flag = size.partition(":")
        if not (eq and name.strip() and gib.strip()) or flag.strip() not in ("", "bf16"):
            raise ValueError(f"TRINITY_QUEUE_GPU_GIB: {entry!r} is not QUEUE=GIB or QUEUE=GIB:bf16")
        out[name.strip()] = {"gib": gib.strip(), "bf16": flag.strip() == "bf16"}
    return out


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRINITY_", env_file=None, extra="ignore")

    env: Literal["development", "production"] = Field(
        "development", description="production refuses insecure defaults.")
    data_dir: Path = Field(
        DEFAULT_DATA_DIR, description="Uploads, job workdirs, the SQLite file, the embedded broker.")
    database_url: str = Field(
        "", description="SQLAlchemy URL; default sqlite:///<data_dir>/trinity.db. PostgreSQL works too.")
    broker_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Celery broker. `trinity serve` falls back to an embedded one.")
    max_upload_mb: float = Field(1024, gt=0, description="Largest upload; bigger bodies get 413 while streaming.")
    model_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Local directories a spec's model.name_or_path may point into (hub ids are always allowed).",
    )
    gpu_queues: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["gpu.default"], description="Queues jobs may be sent to, one per GPU class."
    )
    queue_gpu_gib: Annotated[dict[str, GpuClass], NoDecode] = Field(
        default_factory=dict,
        description="GPU memory per queue (`gpu.t4=15.1,gpu.a100=79:bf16`; `:bf16`: the GPU computes in bf16). "
        "A job submitted without a queue goes to the smallest one its estimate fits; empty: the first of gpu_queues.",
    )
    worker_queues: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Queues this worker consumes (TRINITY_WORKER_QUEUES); default all gpu_queues."
    )
    worker_max_tasks_per_child: int = Field(1, ge=0, description="Fresh process per job (frees GPU memory); 0 = reuse.")
    worker_preload: Literal["auto", "on", "off"] = Field(
        "auto", description="Import the training stack in the worker parent so each job's child starts fast "
        "(auto: only when unsloth is not installed: it must be imported before transformers).",
    )
    task_time_limit_s: int = Field(7 * 24 * 3600, ge=60, description="Hard limit per job run (the child is killed).")
    task_soft_time_limit_s: int = Field(7 * 24 * 3600 - 300, ge=30, description="Soft limit: the job fails cleanly.")
    max_retries: int = Field(3, ge=0, description="Retries of a run that failed with a retryable error (hub download).")
    retry_backoff_s: float = Field(30.0, ge=0, description="First retry delay; doubles each time.")
    heartbeat_interval_s: float = Field(10.0, gt=0, description="How often a running job touches its row.")
    stale_after_s: float = Field(60.0, gt=0, description="A running job whose heartbeat is older is re-queued.")
    reaper_enabled: bool = Field(True, description="Run the reaper thread in each worker's main process.")
    reaper_interval_s: float = Field(15.0, gt=0, description="Seconds between reaper sweeps.")
    requeue_after_s: float = Field(60.0, gt=0, description="A queued job not seen in the broker after this is re-sent.")
    requeue_blind_after_s: float = Field(900.0, gt=0, description="Same, for brokers that cannot be inspected.")
    max_resumes: int = Field(5, ge=0, description="A job whose worker died more often than this fails (worker_lost).")
    cancel_poll_s: float = Field(1.0, gt=0, description="should_stop reads the cancel flag at most this often.")
    sse_poll_s: float = Field(0.5, gt=0, description="How often an event stream looks for new events when no "
                              "notification channel is up (no Redis): one query per job, shared by its followers.")
    sse_fallback_poll_s: float = Field(15.0, gt=0, description="With Redis notifications, each followed job is "
                                       "still read this often, in case a notification was lost.")
    notify_url: str = Field("", description="Redis URL for event and key-revocation notifications (pub/sub); "
                            "default: broker_url when it is Redis; `off` disables them.")
    auth_cache_s: float = Field(5.0, ge=0, description="API key → tenant cache per API process; a revoked key "
                                "is refused at once where Redis carries the revocation, else within this.")
    webhooks_enabled: bool = Field(True, description="Send webhook deliveries from a thread in the API process.")
    webhook_poll_s: float = Field(1.0, gt=0, description="How often the sender looks for due deliveries.")
    webhook_timeout_s: float = Field(10.0, gt=0, description="A receiver must answer within this.")
    webhook_retry_s: float = Field(5.0, gt=0, description="First retry delay of a failed delivery; doubles each time.")
    webhook_retry_max_s: float = Field(3600.0, gt=0, description="Longest delay between two tries.")
    webhook_max_attempts: int = Field(15, ge=1, description="Tries before a delivery is marked failed (~6 h).")
    mlflow_tracking_uri: str = Field(
        "", description="MLflow tracking URI (http://mlflow:5000, file:///srv/mlruns...): each job also logs its "
        "spec, metrics, report and GGUF to an MLflow run (the `tracking` extra). Empty: TensorBoard only.")
    expose_errors: bool | None = Field(
        None, description="Show exception text in 500 responses; default: in development only.")
    # How the worker runs jobs (trinity_core.options.RunOptions, built in worker/runner.py).
    fast_dora: bool = Field(True, description="Trinity's fast DoRA; false runs PEFT's own DoRA (benchmarks).")
    unsloth_compile: Literal["auto", "on", "off"] = Field(
        "auto", description="Unsloth's torch.compile mode (auto: off where Trinity's compiled layers run the job (LoRA on a bf16 GPU) and with DoRA, on otherwise).")
    compiled_layers: bool = Field(True, description="With fast DoRA on a bf16 GPU: each decoder layer compiled as "
                                  "one region (the first step compiles); false runs the layers eagerly.")
    debug_memory: bool = Field(False, description="After a failed OOM-ladder attempt, print what still holds CUDA memory.")
    test_seams: bool = Field(False, description="Allow the test seams below (tests only; refused in production).")
    inject_oom: int = Field(0, ge=0, description="Test seam: the first N training attempts of each job raise an OOM "
                            "at their first step (needs TRINITY_TEST_SEAMS=true).")

    _split_lists = field_validator("model_dirs", "gpu_queues", "worker_queues", mode="before")(_split)
    _parse_gpu_classes = field_validator("queue_gpu_gib", mode="before")(_gpu_classes)

    @model_validator(mode="after")
    def _derive_and_check(self) -> Settings:
        if self.env == "production":
            self._refuse_insecure_defaults()
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'trinity.db').resolve()}"
        if not self.worker_queues:
            self.worker_queues = list(self.gpu_queues)
        if not self.gpu_queues:
            raise ValueError("gpu_queues must name at least one queue")
        if unknown := [name for name in self.queue_gpu_gib if name not in self.gpu_queues]:
            raise ValueError(f"TRINITY_QUEUE_GPU_GIB names {', '.join(unknown)}, not in TRINITY_GPU_QUEUES "
                             f"({', '.join(self.gpu_queues)})")
        if self.task_soft_time_limit_s >= self.task_time_limit_s:
            raise ValueError("task_soft_time_limit_s must be below task_time_limit_s")
        if self.expose_errors is None:
            self.expose_errors = self.env == "development"
        if self.inject_oom and not self.test_seams:
            raise ValueError("TRINITY_INJECT_OOM is a test seam: it needs TRINITY_TEST_SEAMS=true")
        return self

    def _refuse_insecure_defaults(self) -> None:
        problems = []
        if not self.data_dir.is_absolute():
            problems.append("TRINITY_DATA_DIR must be an absolute path")
        if self.expose_errors:
            problems.append("TRINITY_EXPOSE_ERRORS=true leaks internals in 500 responses")
        if self.test_seams:
            problems.append("TRINITY_TEST_SEAMS=true is for tests only")
        for name, url in (("TRINITY_BROKER_URL", self.broker_url), ("TRINITY_DATABASE_URL", self.database_url),
                          ("TRINITY_NOTIFY_URL", self.notify_url)):
            parts = urlsplit(url)
            if parts.scheme.startswith(("redis", "postgres", "amqp")) and parts.hostname not in LOOPBACK \
                    and not parts.password:
                problems.append(f"{name} reaches {parts.hostname} without a password")
        if problems:
            raise ValueError("refusing insecure settings in production: " + "; ".join(problems))

    def run_options(self) -> RunOptions:
        """How this worker runs a job (``run_job(..., options=...)``)."""
        return RunOptions(fast_dora=self.fast_dora, debug_memory=self.debug_memory, test_seams=self.test_seams,
                          unsloth_compile={"auto": None, "on": True, "off": False}[self.unsloth_compile],
                          compiled_layers=self.compiled_layers, inject_oom=self.inject_oom,
                          mlflow_tracking_uri=self.mlflow_tracking_uri or None)

    @property
    def notify_redis_url(self) -> str | None:
        """Where event / key notifications go (``trinity_service.notify``); None: nowhere (poll)."""
        url = self.broker_url if not self.notify_url else self.notify_url
        return url if url != "off" and url.startswith(("redis://", "rediss://", "unix://")) else None

    @property
    def default_queue(self) -> str:
        return self.gpu_queues[0]

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


_configured: Settings | None = None


def configure(settings: Settings | None) -> None:
    """Use ``settings`` in this process instead of reading the environment (``trinity serve``, after
    it chose the broker); None reads the environment again."""
    global _configured
    _configured = settings
    get_settings.cache_clear()


@lru_cache
def get_settings() -> Settings:
    return _configured if _configured is not None else Settings()
