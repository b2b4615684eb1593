"""``trinity serve`` (API + one worker process) and ``trinity keys`` (create / list / revoke).

fastapi, uvicorn and celery are imported only when these commands run.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

REDIS_DEFAULT = "redis://127.0.0.1:6379/0"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the API and a worker (Redis, or an embedded broker without it)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--queues", help="queues the worker consumes (comma-separated; default all GPU queues)")
    serve.add_argument("--no-worker", action="store_true", help="API only (workers run elsewhere)")
    serve.set_defaults(func=cmd_serve)

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys_sub.add_parser("create", help="create a key for a tenant and print it (once)")
    create.add_argument("--tenant", required=True)
    create.set_defaults(func=cmd_keys_create)
    listing = keys_sub.add_parser("list", help="list keys (prefixes only)")
    listing.add_argument("--tenant")
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id", type=int)
    revoke.set_defaults(func=cmd_keys_revoke)


# ── keys ─────────────────────────────────────────────────────────────────────────────────────

def cmd_keys_create(args: argparse.Namespace) -> int:
    from trinity_service import crud
    from trinity_service.db import init_db, session_scope

    init_db()
    with session_scope() as session:
        row, key = crud.create_api_key(session=session, tenant=args.tenant)
    print(f"created key {row.id} ({row.prefix}…) for tenant {row.tenant!r}; it is shown only now:", file=sys.stderr)
    print(key)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from trinity_service import crud
    from trinity_service.db import init_db, session_scope

    init_db()
    with session_scope() as session:
        for row in crud.list_api_keys(session=session, tenant=args.tenant):
            state = "revoked" if row.revoked_at else "active"
            print(f"{row.id}\t{row.tenant}\t{row.prefix}…\t{state}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from trinity_service import crud
    from trinity_service.db import init_db, session_scope

    init_db()
    with session_scope() as session:
        if not crud.revoke_api_key(session=session, key_id=args.key_id):
            print(f"no active key {args.key_id}", file=sys.stderr)
            return 1
    print(f"revoked key {args.key_id}", file=sys.stderr)
    return 0


# ── serve ────────────────────────────────────────────────────────────────────────────────────

def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from trinity_service import settings as service_settings
    from trinity_service.db import init_db

    # The choices made here are passed on explicitly: to this process's settings (the API runs in
    # it) and in the worker child's environment; this process's own environment is left alone.
    chosen = {"broker_url": choose_broker(), **({"worker_queues": args.queues} if args.queues else {})}
    settings = service_settings.Settings(**chosen)
    service_settings.configure(settings)
    init_db()
    print(f"trinity: data in {settings.data_dir}, broker {_redact(settings.broker_url)}", file=sys.stderr)
    child_env = {"TRINITY_BROKER_URL": settings.broker_url, "TRINITY_WORKER_QUEUES": ",".join(settings.worker_queues)}
    worker = None if args.no_worker else WorkerProcess(settings.worker_queues, env=child_env)
    if worker:
        worker.start()
    # uvicorn re-raises SIGTERM after its graceful shutdown; make that an exit that runs `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run("api.main:app", host=args.host, port=args.port, log_level="info")
    finally:
        if worker:
            worker.stop()
    return 0


def choose_broker() -> str:
    """TRINITY_BROKER_URL if set; else local Redis if it answers; else the embedded broker (kombu's
    SQLAlchemy transport on a SQLite file in the data dir: durable, no Redis needed)."""
    if os.environ.get("TRINITY_BROKER_URL"):
        return os.environ["TRINITY_BROKER_URL"]
    if redis_answers(REDIS_DEFAULT):
        url = REDIS_DEFAULT
    else:
        from trinity_service.settings import Settings

        data_dir = Settings().data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        url = f"sqla+sqlite:///{data_dir / 'broker.sqlite'}"
        print("trinity: no Redis on 127.0.0.1:6379; using the embedded broker", file=sys.stderr)
    return url


def redis_answers(url: str, timeout: float = 0.5) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def _redact(url: str) -> str:
    parts = urlsplit(url)
    return url.replace(f":{parts.password}@", ":***@") if parts.password else url


class WorkerProcess:
    """One Celery worker (its own process group), restarted if it dies; stopped with the API.

    Stopping is a cold shutdown after a short grace period: a training job in progress is left
    with a stale heartbeat, and the reaper of the next ``trinity serve`` resumes it from its checkpoint.
    """

    def __init__(self, queues: list[str], grace_s: float = 10.0, env: dict[str, str] | None = None):
        self.queues, self.grace_s = queues, grace_s
        self.env = {**os.environ, **(env or {})}  # the child's environment: ours plus the choices made
        self.proc: subprocess.Popen | None = None
        self._stopping = threading.Event()

    def command(self) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--loglevel", "INFO",
                "--concurrency", "1", "-Q", ",".join(self.queues), "-n", f"trinity-{os.getpid()}@%h",
                "--without-mingle", "--without-gossip", "--without-heartbeat"]

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command(), start_new_session=True, env=self.env)
        threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True).start()

    def _supervise(self) -> None:
        while not self._stopping.wait(2.0):
            if self.proc is not None and self.proc.poll() is not None and not self._stopping.is_set():
                print(f"trinity: worker exited ({self.proc.returncode}); restarting", file=sys.stderr)
                self.proc = subprocess.Popen(self.command(), start_new_session=True, env=self.env)

    def stop(self) -> None:
        self._stopping.set()
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
