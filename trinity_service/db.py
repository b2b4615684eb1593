"""Engine and sessions. SQLite runs in WAL mode with a busy timeout so the API, the worker and
the reaper can write the same file; ``TRINITY_DATABASE_URL=postgresql://...`` works unchanged.

One engine per (process, URL): a Celery child forked from the worker parent must not reuse
the parent's connections.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url
from sqlmodel import Session, SQLModel, create_engine

from trinity_service import models, webhook_models  # noqa: F401  (registers the tables)
from trinity_service.settings import get_settings

SQLITE_BUSY_TIMEOUT_MS = 30_000
# No fixed ceiling on connections. With SQLAlchemy's default 5 + 10, 16+ concurrent requests
# deadlocked: FastAPI runs a request's sync stages (dependencies, endpoint, serialisation, the
# session's close) on separate threadpool hops, a request holds its connection between hops, and all
# 40 threads ended up waiting for a connection held by requests waiting for a thread; 500 after 30 s
# (found by bench/load.py at 100 clients). 10 stay pooled; bursts open more (PostgreSQL: keep
# max_connections above the burst, or put PgBouncer in front).
POOL = {"pool_size": 10, "max_overflow": -1}
_engines: dict[tuple[int, str], Engine] = {}


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, **POOL)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
                           **POOL)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record):  # noqa: ANN001
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return engine


def get_engine(url: str | None = None) -> Engine:
    url = url or get_settings().database_url
    key = (os.getpid(), url)
    if key not in _engines:
        _engines[key] = make_engine(url)
    return _engines[key]


def init_db(engine: Engine | None = None) -> None:
    """Create missing tables (the schema is small and additive; no migration tool yet)."""
    SQLModel.metadata.create_all(engine or get_engine())


def get_session() -> Iterator[Session]:
    with Session(get_engine()) as session:
        yield session


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session for code outside a request (worker, reaper, CLI)."""
    with Session(get_engine()) as session:
        yield session
