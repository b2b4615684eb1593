"""The worker's Celery app (the consuming side; ``trinity_service.queue`` sends), and the reaper
thread it runs.

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
- the reaper (``worker/reaper.py``) runs as a thread of the worker's main process, started when
  the worker is ready (``reaper_enabled``): it needs the broker and the database, which a worker
  has, and any number of them may run. A job's child forked beside the thread inherits none of
  its connections: the child builds its own database engine (``trinity_service/db.py``) and Celery
  resets the broker pool after the fork.
"""

from __future__ import annotations

import importlib.util
import logging

from celery import Celery, signals
from kombu import Queue

from trinity_service.queue import configure
from trinity_service.settings import Settings, get_settings

log = logging.getLogger("trinity.worker")


def make_app(settings: Settings) -> Celery:
    app = configure(Celery("trinity", include=["worker.tasks"]), settings)
    app.conf.update(
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=settings.broker_url.startswith(("redis", "rediss")),
        worker_concurrency=1,
        worker_max_tasks_per_child=settings.worker_max_tasks_per_child or None,
        task_track_started=True,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_queues=[Queue(name, routing_key=name) for name in settings.worker_queues],
        worker_send_task_events=False,
        worker_enable_remote_control=not settings.broker_url.startswith("sqla+"),  # unsupported there
    )
    return app


app = make_app(get_settings())


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


@signals.worker_ready.connect
def _start_reaper(sender=None, **_: object) -> None:
    """The reaper sweeps from the worker's main process (never from a job's child)."""
    settings = get_settings()
    if settings.reaper_enabled:
        from worker import reaper

        reaper.start_thread(settings)
