"""The queue, from the sending side: ``enqueue`` publishes "run job X" by task name.

The API and the reaper send; the worker (``worker/app.py``) defines the task under ``TASK_NAME``
and consumes. The producer is a Celery app that knows the broker and nothing of the task's
code, so sending never imports the worker (tests/test_architecture.py).
"""

from __future__ import annotations

import logging
import secrets
from functools import lru_cache

from celery import Celery
from sqlmodel import Session

from trinity_service import crud
from trinity_service.models import Job
from trinity_service.settings import Settings, get_settings

TASK_NAME = "trinity.run_training"
log = logging.getLogger("trinity.queue")


def configure(app: Celery, settings: Settings) -> Celery:
    """Broker settings both sides need (the worker adds its consumer settings on top)."""
    if settings.broker_url.startswith("sqla+"):
        # FACTS.md: passing this in broker_transport_options breaks create_engine; 0.1 s, not 1 s, latency.
        import kombu.transport.sqlalchemy

        kombu.transport.sqlalchemy.Transport.polling_interval = 0.1
    app.conf.update(
        broker_url=settings.broker_url,
        task_default_queue=settings.default_queue,
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        task_ignore_result=True,
        result_backend=None,
    )
    return app


@lru_cache
def producer() -> Celery:
    """The sending app for this process's settings (one per process, made on first use)."""
    return configure(Celery("trinity"), get_settings())


def enqueue(*, session: Session, job: Job) -> bool:
    """Send a message for a queued job (after its row is committed). A failure is logged, not
    raised: the job stays queued and the reaper sends it again."""
    task_id = f"{job.id}.{secrets.token_hex(4)}"
    try:
        producer().send_task(TASK_NAME, args=[job.id], queue=job.queue, routing_key=job.queue, task_id=task_id)
    except Exception as error:  # broker down: kombu/redis raise OperationalError, ConnectionError...
        log.warning("could not enqueue %s (%s); the reaper will retry", job.id, error)
        return False
    crud.mark_enqueued(session=session, job_id=job.id, task_id=task_id)
    return True
