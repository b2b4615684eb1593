"""Service fixtures. DB-level tests run twice: on a SQLite file and on a fresh PostgreSQL database
(created for the session on postgresql://postgres@127.0.0.1:5432, dropped after; skipped if
PostgreSQL does not answer). Brokers are real: Redis DB 15, flushed per session."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("TRINITY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TRINITY_TEST_REDIS", "redis://127.0.0.1:6379/15")

# Before any api/worker import: in-process apps use the test broker and no reaper thread.
os.environ["TRINITY_BROKER_URL"] = REDIS_URL
os.environ["TRINITY_REAPER_ENABLED"] = "false"
os.environ["TRINITY_WEBHOOKS_ENABLED"] = "false"  # tests send deliveries themselves (api/webhook_sender.py)
os.environ["TRINITY_GPU_QUEUES"] = "gpu.default,gpu.t4"
os.environ["TRINITY_MAX_UPLOAD_MB"] = "1"
os.environ["TRINITY_MAX_RETRIES"] = "1"
os.environ["TRINITY_RETRY_BACKOFF_S"] = "0"


def alpaca_rows(n: int, *, bad: int = 0) -> bytes:
    lines = [json.dumps({"instruction": f"What is {i} plus {i}?", "output": f"{i} plus {i} is {2 * i}."})
             for i in range(n)]
    lines += ["{not json" for _ in range(bad)]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="session")
def redis_client():
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {REDIS_URL}")
    client.flushdb()
    yield client
    client.flushdb()


def _postgres_database():
    import psycopg2
    from sqlalchemy.engine import make_url

    name = f"trinity_test_{secrets.token_hex(4)}"
    try:
        admin = psycopg2.connect(PG_ADMIN_URL, connect_timeout=3)
    except psycopg2.OperationalError as error:
        pytest.skip(f"no PostgreSQL at {PG_ADMIN_URL}: {error}")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    url = make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg2", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        from trinity_service import db

        for key in [k for k in db._engines if k[1].endswith(f"/{name}")]:
            db._engines.pop(key).dispose()
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(request, tmp_path_factory):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'trinity.db'}"
    else:
        yield from _postgres_database()


@pytest.fixture
def settings(database_url, tmp_path_factory, monkeypatch):
    """Settings pointing at this parameter's database and a data dir shared per database."""
    from trinity_service.db import init_db
    from trinity_service.settings import get_settings

    data_dir = tmp_path_factory.getbasetemp() / f"data-{abs(hash(database_url)) % 10**8}"
    monkeypatch.setenv("TRINITY_DATABASE_URL", database_url)
    monkeypatch.setenv("TRINITY_DATA_DIR", str(data_dir))
    get_settings.cache_clear()
    init_db()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture
def session(settings):
    from trinity_service.db import session_scope

    with session_scope() as s:
        yield s


@pytest.fixture
def enqueued(monkeypatch):
    """Record enqueues instead of publishing (API tests need no worker)."""
    from trinity_service import queue
    from trinity_service import crud

    sent: list[str] = []

    def fake_enqueue(*, session, job):
        sent.append(job.id)
        crud.mark_enqueued(session=session, job_id=job.id, task_id=f"{job.id}.fake")
        return True

    monkeypatch.setattr(queue, "enqueue", fake_enqueue)
    return sent


@pytest.fixture
def client(settings, enqueued):
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(create_app()) as c:
        yield c


def new_tenant(session) -> tuple[str, dict[str, str]]:
    from trinity_service import crud

    tenant = f"tenant-{secrets.token_hex(3)}"
    _, key = crud.create_api_key(session=session, tenant=tenant)
    return tenant, {"Authorization": f"Bearer {key}"}


@pytest.fixture
def auth(session):
    """(tenant, headers) of a fresh tenant."""
    return new_tenant(session)


@pytest.fixture
def dataset_id(client, auth):
    r = client.post("/datasets", headers=auth[1], files={"file": ("train.jsonl", alpaca_rows(12))})
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.fixture(autouse=True)
def hub_cache(tmp_path_factory, monkeypatch) -> Path:
    """An offline Hugging Face cache holding ``org/some-model`` (config and weights), the model
    ``job_body`` names: POST /jobs refuses a model it cannot find before queueing the job."""
    import huggingface_hub.constants

    from tests.helpers import cache_hub_model

    cache = tmp_path_factory.mktemp("hf-cache")
    cache_hub_model(cache, "org/some-model", {"config.json": '{"model_type": "gemma3_text"}', "model.safetensors": ""})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def job_body(dataset_id: str, **parts) -> dict:
    body = {"model": {"name_or_path": "org/some-model", "max_seq_length": 128}, "lora": {"r": 8, "alpha": 16},
            "train": {"max_steps": 3}, "export": {"merge": False, "gguf": False, "evaluate": False},
            "data": {"dataset_id": dataset_id}}
    body.update(parts)
    return body


@pytest.fixture
def data_dir(settings) -> Path:
    return settings.data_dir


# ── a running service shared by the dashboard and client-CLI tests ───────────────────────────

@pytest.fixture(scope="session")
def live_service(tiny_model_dir, tmp_path_factory, redis_client):
    """API + worker processes (``tests/service/live.py``), tenant ``acme`` (``.key``) and ``intruder``."""
    from .live import running_stack

    yield from running_stack(tiny_model_dir, tmp_path_factory.mktemp("live"))


@pytest.fixture(scope="session")
def finished_job(live_service) -> dict:
    """The one job of the session that exports (merge, f16 GGUF) and evaluates: artifacts and a report."""
    from .live import tiny_job

    body = tiny_job(live_service, live_service.dataset_id, export=True, max_steps=4)
    body["export"].update(evaluate=True, eval_prompts=1, max_new_tokens=8)
    job = live_service.submit(body)
    return live_service.wait_status(job["id"], "succeeded")
