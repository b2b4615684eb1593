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

from sqlalchemy import Connection, Engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
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
    """Create missing tables, and add missing nullable columns to existing ones (the schema is
    small and additive; no migration tool yet)."""
    engine = engine or get_engine()
    SQLModel.metadata.create_all(engine)
    add_missing_columns(engine)


def add_missing_columns(engine: Engine) -> list[str]:
    """``ALTER TABLE ... ADD COLUMN`` for each nullable column a table of an older release lacks
    (``job.routing``...), so an upgraded service starts on its old database. A new NOT NULL
    column would need a default for the old rows: that is a migration, and refused here."""
    added = []
    existing = inspect(engine)
    for table in SQLModel.metadata.sorted_tables:
        if not existing.has_table(table.name):
            continue
        have = {c["name"] for c in existing.get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            if not column.nullable:
                raise RuntimeError(f"table {table.name} lacks the NOT NULL column {column.name}: migrate it by hand")
            kind = column.type.compile(dialect=engine.dialect)
            try:
                with engine.begin() as conn:
                    conn.execute(text(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}'))
            except DBAPIError:  # the API and each worker start together: another process added it first
                if column.name not in {c["name"] for c in inspect(engine).get_columns(table.name)}:
                    raise
                continue
            added.append(f"{table.name}.{column.name}")
    return added


def get_session() -> Iterator[Session]:
    with Session(get_engine()) as session:
        yield session


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session for code outside a request (worker, reaper, CLI)."""
    with Session(get_engine()) as session:
        yield session


_readers: dict[tuple[int, str], Connection] = {}


def loop_reader() -> Connection | None:
    """On SQLite, one autocommit connection per process for short reads made on the event loop's
    thread (the hot GET /jobs/{id}): no session, no pool checkout, and no transaction held between
    reads, so each SELECT sees the latest commit. None on other databases: read them in a thread."""
    engine = get_engine()
    if engine.dialect.name != "sqlite":
        return None
    key = (os.getpid(), str(engine.url))
    if key not in _readers:
        _readers[key] = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    return _readers[key]
