"""A running service for end-to-end tests: uvicorn and Celery worker processes (each in its own
process group, logging to a file), Redis (DB 15, a queue name unique to the stack), a SQLite file
(``TRINITY_TEST_SERVICE_DB=postgresql`` switches to a fresh PostgreSQL database), httpx as the
client. Used by ``test_lifecycle.py`` (its own stack, which it restarts and kills) and by the
session-wide ``live_service`` fixture in ``conftest.py`` (dashboard and client CLI tests)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .conftest import REDIS_URL, _postgres_database, alpaca_rows

ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Proc:
    """A child process in its own process group, logging to a file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path):
        self.name, self.log = name, log_dir / f"{name}-{time.time_ns()}.log"
        self.handle = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self.handle, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig=signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace: float = 20) -> None:
        self.kill(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        self.kill(signal.SIGKILL)
        self.proc.wait(10)
        self.handle.close()


class Stack:
    def __init__(self, root: Path, env: dict[str, str], queue: str):
        self.root, self.env, self.queue = root, env, queue
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.api: Proc | None = None
        self.workers: dict[str, Proc] = {}
        self.key = self.cli("keys", "create", "--tenant", "acme")
        self.other_key = self.cli("keys", "create", "--tenant", "intruder")
        self.http = httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)

    def cli(self, *args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "cli", *args], env=self.env, cwd=ROOT, capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()

    def start_api(self) -> None:
        self.api = Proc("api", [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
                                "--port", str(self.port)], self.env, self.root)
        wait_for(self._healthy, 60, "the API")

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def start_worker(self, name: str, queue: str, **extra_env: str) -> Proc:
        env = {**self.env, "TRINITY_WORKER_QUEUES": queue, **extra_env}
        proc = Proc(name, [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--loglevel", "INFO",
                           "-c", "1", "-n", f"{name}-{queue}@%h", "--without-mingle", "--without-gossip",
                           "--without-heartbeat"], env, self.root)
        self.workers[name] = proc
        return proc

    def wait_ready(self, proc: Proc) -> None:
        wait_for(lambda: " ready." in proc.text() or not proc.alive(), 180, f"worker {proc.name}")
        assert proc.alive(), proc.text()[-3000:]

    def submit(self, body: dict, queue: str | None = None) -> dict:
        r = self.http.post("/jobs", json=body, params={"queue": queue} if queue else None)
        assert r.status_code == 201, r.text
        return r.json()

    def job(self, job_id: str) -> dict:
        return self.http.get(f"/jobs/{job_id}").json()

    def wait_status(self, job_id: str, *statuses: str, timeout: float = JOB_TIMEOUT) -> dict:
        def check():
            job = self.job(job_id)
            if job["status"] in ("failed",) and "failed" not in statuses:
                raise AssertionError(f"job failed: {job['error']}\n{self.logs()}")
            return job if job["status"] in statuses else None

        return wait_for(check, timeout, f"{job_id} to be {'/'.join(statuses)}")

    def events(self, job_id: str, **params) -> list[dict]:
        out, after = [], 0
        while True:
            page = self.http.get(f"/jobs/{job_id}/events", params={"after": after, "limit": 1000, **params}).json()
            out += page["data"]
            if not page["has_more"]:
                return out
            after = page["last_seq"]

    def logs(self) -> str:
        parts = [f"--- {p.name} ---\n{p.text()[-4000:]}" for p in [self.api, *self.workers.values()] if p]
        return "\n".join(parts)

    def close(self) -> None:
        for proc in [*self.workers.values(), self.api]:
            if proc is not None:
                proc.stop(grace=5)


def tiny_job(stack, dataset_id: str, *, export: bool = False, **train) -> dict:
    return {
        "model": {"name_or_path": stack.model, "max_seq_length": 64},
        "lora": {"r": 8, "alpha": 16, "use_dora": False},
        "train": {"max_steps": 4, "batch_size": 2, "grad_accum": 1, "save_steps": 2, "warmup_steps": 1, **train},
        "export": ({"merge": True, "gguf": True, "quantizations": ["f16"], "evaluate": False} if export
                   else {"merge": False, "gguf": False, "evaluate": False}),
        "data": {"dataset_id": dataset_id},
    }


def running_stack(tiny_model_dir: Path, root: Path):
    """Start a worker and the API on a fresh data dir, upload a 40-row dataset; yield the Stack, then stop it."""
    queue = f"test.{secrets.token_hex(3)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRINITY_")}
    env.update({
        "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),  # 2 shared cores: spinning threads cost 7x
        "TRINITY_DATA_DIR": str(root / "data"), "TRINITY_BROKER_URL": REDIS_URL,
        "TRINITY_GPU_QUEUES": f"{queue},{queue}.oom", "TRINITY_MODEL_DIRS": str(Path(tiny_model_dir).parent),
        "TRINITY_HEARTBEAT_INTERVAL_S": "1", "TRINITY_STALE_AFTER_S": "8", "TRINITY_REAPER_INTERVAL_S": "1",
        "TRINITY_REQUEUE_AFTER_S": "3", "TRINITY_CANCEL_POLL_S": "0.2", "TRINITY_SSE_POLL_S": "0.2",
    })
    pg = None
    if os.environ.get("TRINITY_TEST_SERVICE_DB") == "postgresql":
        pg = _postgres_database()
        env["TRINITY_DATABASE_URL"] = next(pg)
    stack = Stack(root, env, queue)
    try:
        stack.model = str(tiny_model_dir)
        stack.start_worker("worker", queue)  # imports the training stack while the API starts
        stack.start_api()
        r = stack.http.post("/datasets", files={"file": ("train.jsonl", alpaca_rows(40))})
        assert r.status_code == 201, r.text
        stack.dataset_id = r.json()["id"]
        stack.wait_ready(stack.workers["worker"])
        yield stack
    finally:
        stack.close()
        if pg is not None:
            next(pg, None)
