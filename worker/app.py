"""The Celery app and ``enqueue``.

Settings for long GPU jobs, and why:

- ``task_acks_late=False`` (ack when the task starts). A message only says "try to claim job X";
  the job row is the truth. With ``acks_late`` a job longer than the broker's visibility timeout
  would be redelivered while it still runs, and a killed worker's job would come back only after
  that timeout. Instead a dead worker is found by its stale heartbeat and re-queued by the reaper
  (``worker/reaper.py``), and the task's atomic claim makes any duplicate message harmless.
- one task at a time: ``worker_concurrency=1`` (one worker per GPU), ``prefetch_multiplier=1`` and,
  on Redis, ``worker_disable_prefetch`` so a busy worker does not hold the next job back from an
  idle one.
- ``worker_max_tasks_per_child=1``: each job runs in a fresh child process, so all GPU memory and
  library patches (Unsloth) go away with it.
- ``task_track_started``, hard/soft time limits, no result backend (the row holds results).
- queues are named per GPU class (``gpu.default``, ``gpu.t4``...); a worker consumes
  ``TRINITY_WORKER_QUEUES`` (default: all of ``TRINITY_GPU_QUEUES``).
"""

from __future__ import annotations

import importlib.util
import logging
import secrets

from celery import Celery, signals
from kombu import Queue
from sqlmodel import Session

from trinity_service import crud
from trinity_service.models import Job
from trinity_service.settings import Settings, get_settings

TASK_NAME = "trinity.run_training"
log = logging.getLogger("trinity.worker")


def make_app(settings: Settings) -> Celery:
    if settings.broker_url.startswith("sqla+"):
        # FACTS.md: passing this in broker_transport_options breaks create_engine; 0.1 s, not 1 s, latency.
        import kombu.transport.sqlalchemy

        kombu.transport.sqlalchemy.Transport.polling_interval = 0.1
    app = Celery("trinity", broker=settings.broker_url, include=["worker.tasks"])
    app.conf.update(
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=settings.broker_url.startswith(("redis", "rediss")),
        worker_concurrency=1,
        worker_max_tasks_per_child=settings.worker_max_tasks_per_child or None,
        task_track_started=True,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_ignore_result=True,
        result_backend=None,
        task_default_queue=settings.default_queue,
        task_queues=[Queue(name, routing_key=name) for name in settings.worker_queues],
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        worker_send_task_events=False,
        worker_enable_remote_control=not settings.broker_url.startswith("sqla+"),  # unsupported there
    )
    return app


app = make_app(get_settings())


def enqueue(*, session: Session, job: Job) -> bool:
    """Send a message for a queued job (after its row is committed). A failure is logged, not
    raised: the job stays queued and the reaper sends it again."""
    task_id = f"{job.id}.{secrets.token_hex(4)}"
    try:
        app.send_task(TASK_NAME, args=[job.id], queue=job.queue, routing_key=job.queue, task_id=task_id)
    except Exception as error:  # broker down: kombu/redis raise OperationalError, ConnectionError...
        log.warning("could not enqueue %s (%s); the reaper will retry", job.id, error)
        return False
    crud.mark_enqueued(session=session, job_id=job.id, task_id=task_id)
    return True


@signals.worker_init.connect
def _preload(**_: object) -> None:
    """Import the training stack once in the worker parent; each job's child forks with it loaded.
    Skipped when unsloth is installed (it must be imported before transformers, in the child)."""
    mode = get_settings().worker_preload
    if mode == "off" or (mode == "auto" and importlib.util.find_spec("unsloth") is not None):
        return
    import peft  # noqa: F401
    import trl  # noqa: F401

    import trinity_core.data.prepare  # noqa: F401
    import trinity_core.pipeline  # noqa: F401
    import trinity_core.train.trainer  # noqa: F401  (transformers)
