"""Reliability fixtures: one real stack (uvicorn + Celery worker + Redis DB 14 + a SQLite file)
shared by the module's tests, built from the service suite's ``Stack`` (tests/service/test_lifecycle.py).

Queues: ``<q>`` is consumed by the worker; ``<q>.parked`` is consumed by nobody (load tests fill
it without training anything); ``<q>.oom`` gets a worker started with ``TRINITY_INJECT_OOM``.
Timeouts are generous: the 2 cores are shared.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from tests.service.live import ROOT, Stack

REL_REDIS_URL = os.environ.get("TRINITY_TEST_RELIABILITY_REDIS", "redis://127.0.0.1:6379/14")
MAX_UPLOAD_MB = 12  # above the 10 MB single-line corpus file, small enough to overflow quickly


def stack_env(root: Path, queue: str, model_dir: Path, broker_url: str = REL_REDIS_URL, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRINITY_")}
    env.update({
        "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "TRINITY_DATA_DIR": str(root / "data"), "TRINITY_BROKER_URL": broker_url,
        "TRINITY_GPU_QUEUES": f"{queue},{queue}.oom,{queue}.parked", "TRINITY_MODEL_DIRS": str(model_dir.parent),
        "TRINITY_HEARTBEAT_INTERVAL_S": "1", "TRINITY_STALE_AFTER_S": "5", "TRINITY_REAPER_INTERVAL_S": "1",
        "TRINITY_REQUEUE_AFTER_S": "3", "TRINITY_CANCEL_POLL_S": "0.2", "TRINITY_SSE_POLL_S": "0.2",
        "TRINITY_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB), "TRINITY_MAX_RESUMES": "20",
        **extra,
    })
    return env


@pytest.fixture(scope="session")
def rel_redis():
    import redis

    client = redis.Redis.from_url(REL_REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {REL_REDIS_URL}")
    client.flushdb()
    yield client
    client.flushdb()


def make_stack(root: Path, model_dir: Path, *, worker: bool = True, broker_url: str = REL_REDIS_URL,
               **extra: str) -> Stack:
    queue = f"rel.{secrets.token_hex(3)}"
    stack = Stack(root, stack_env(root, queue, Path(model_dir), broker_url, **extra), queue)
    stack.model = str(model_dir)
    if worker:
        stack.start_worker("worker", queue)
    stack.start_api()
    return stack


@pytest.fixture(scope="module")
def rstack(tiny_model_dir, tmp_path_factory, rel_redis):
    """A stack with a worker on ``<q>`` (started lazily by tests that train: ``ensure_worker``)."""
    stack = make_stack(tmp_path_factory.mktemp("rel"), tiny_model_dir, worker=False)
    yield stack
    stack.close()
    for name in (stack.queue, f"{stack.queue}.parked", f"{stack.queue}.oom"):
        rel_redis.delete(name)
