"""End to end with real parts: uvicorn and Celery worker processes, Redis (DB 15, a queue name
unique to this session), a SQLite file (``TRINITY_TEST_SERVICE_DB=postgresql`` switches to a
fresh PostgreSQL database), the tiny Gemma-3 trained for a few steps, httpx as the client.

One worker serves the module; the OOM test adds a second one (``TRINITY_INJECT_OOM`` must be in
the worker's environment) on its own queue. Timeouts are generous: the 2 cores are shared.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import REDIS_URL, _postgres_database, alpaca_rows

pytestmark = pytest.mark.slow
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


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory, redis_client):
    root = tmp_path_factory.mktemp("service")
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
    stack.model = str(tiny_model_dir)
    stack.start_worker("worker", queue)  # imports the training stack while the API starts
    stack.start_api()
    r = stack.http.post("/datasets", files={"file": ("train.jsonl", alpaca_rows(40))})
    assert r.status_code == 201, r.text
    stack.dataset_id = r.json()["id"]
    stack.wait_ready(stack.workers["worker"])
    yield stack
    stack.close()
    if pg is not None:
        next(pg, None)


def read_sse(stack: Stack, job_id: str, *, last_event_id: int | None = None, stop_after: int | None = None):
    """Events from the SSE stream (and the end event, if reached); stop_after disconnects early."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    events, end, block = [], None, {}
    with stack.http.stream("GET", f"/jobs/{job_id}/events/stream", headers=headers,
                           timeout=httpx.Timeout(10, read=120)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith(":"):
                continue
            if line:
                field, _, value = line.partition(":")
                block[field] = value.removeprefix(" ")
                continue
            if block.get("event") == "end":
                end = json.loads(block["data"])
                break
            if "data" in block:
                event = json.loads(block["data"])
                assert int(block["id"]) == event["seq"]
                events.append(event)
                if stop_after and len(events) >= stop_after:
                    break
            block = {}
    return events, end


def test_full_lifecycle_survives_an_api_restart(stack):
    job = stack.submit(tiny_job(stack, stack.dataset_id, export=True, max_steps=6))
    assert job["status"] == "queued"
    stack.wait_status(job["id"], "running", "succeeded")
    first, end = read_sse(stack, job["id"], stop_after=4)
    assert end is None and [e["seq"] for e in first] == [1, 2, 3, 4]

    assert stack.job(job["id"])["status"] == "running"
    stack.api.stop()  # restart the API mid-job: the worker keeps writing to the database
    stack.start_api()
    rest, end = read_sse(stack, job["id"], last_event_id=first[-1]["seq"])
    assert end == {"status": "succeeded"}, stack.logs()
    streamed = first + rest
    assert [e["seq"] for e in streamed] == list(range(1, len(streamed) + 1))  # nothing lost, nothing twice
    assert streamed == stack.events(job["id"])

    done = stack.job(job["id"])
    assert done["status"] == "succeeded" and done["error"] is None and done["resumes"] == 0
    assert done["step"] == done["total_steps"] == 6 and done["loss"] > 0 and done["tokens_per_s"]
    assert done["created_at"] <= done["queued_at"] <= done["started_at"] <= done["finished_at"]
    assert done["settings"]["r"] == 8 and done["rung"] == "recipe" and done["attempts"][0]["outcome"] == "ok"
    assert done["result"]["resolved_spec"]["data"]["dataset_id"] == stack.dataset_id
    assert stack.env["TRINITY_DATA_DIR"] not in json.dumps(done)  # no server paths in the API
    statuses = [e["data"]["status"] for e in streamed if e["type"] == "status" and "status" in e["data"]]
    assert statuses == ["validating_files", "queued", "running", "succeeded"]
    assert [e["data"]["step"] for e in streamed if e["type"] == "metrics"] == [1, 2, 3, 4, 5, 6]
    assert [c["step"] for c in stack.http.get(f"/jobs/{job['id']}/checkpoints").json()] == [4, 6]  # newest 2 kept

    manifest = stack.http.get(f"/jobs/{job['id']}/artifacts").json()
    names = {a["name"]: a for a in manifest}
    gguf = [a for a in manifest if a["kind"] == "gguf"]
    wanted = gguf[0] if gguf else names.get("adapter_model.safetensors")
    assert wanted is not None, f"no GGUF or adapter in the manifest: {manifest}"
    url = f"/jobs/{job['id']}/artifacts/{wanted['name']}"
    r = stack.http.get(url)
    assert r.status_code == 200 and int(r.headers["content-length"]) == wanted["size"] == len(r.content)
    assert hashlib.sha256(r.content).hexdigest() == wanted["sha256"] and r.headers["etag"] == f'"{wanted["sha256"]}"'
    if gguf:
        assert r.content[:4] == b"GGUF"
    half = wanted["size"] // 2  # an interrupted download resumes with Range
    head = stack.http.get(url, headers={"Range": f"bytes=0-{half - 1}"})
    tail = stack.http.get(url, headers={"Range": f"bytes={half}-", "If-Range": r.headers["etag"]})
    assert (head.status_code, tail.status_code) == (206, 206) and head.content + tail.content == r.content

    intruder = {"Authorization": f"Bearer {stack.other_key}"}
    assert stack.http.get(f"/jobs/{job['id']}", headers=intruder).status_code == 404
    assert stack.http.get(url, headers=intruder).status_code == 404
    assert httpx.get(f"{stack.base}/jobs/{job['id']}").status_code == 401


def test_cancel_queued_and_running_jobs_and_resend_a_lost_message(stack, redis_client):
    long = stack.submit(tiny_job(stack, stack.dataset_id, max_steps=400, save_steps=2))
    stack.wait_status(long["id"], "running")
    never = stack.submit(tiny_job(stack, stack.dataset_id))
    lost = stack.submit(tiny_job(stack, stack.dataset_id))
    assert stack.job(lost["id"])["queue_position"] == 2

    cancelled = stack.http.post(f"/jobs/{never['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["started_at"] is None

    redis_client.delete(stack.queue)  # Redis lost its queue (restart without persistence)
    wait_for(lambda: any("not in the broker" in e["message"] for e in stack.events(lost["id"])), 30,
             "the reaper to re-send the lost message")
    assert stack.job(lost["id"])["status"] == "queued"
    waiting = [json.loads(m)["headers"]["id"] for m in redis_client.lrange(stack.queue, 0, -1)]
    assert any(task_id.startswith(lost["id"]) for task_id in waiting), waiting  # its message is back
    assert stack.http.post(f"/jobs/{lost['id']}/cancel").json()["status"] == "cancelled"

    wait_for(lambda: stack.http.get(f"/jobs/{long['id']}/checkpoints").json(), JOB_TIMEOUT, "a checkpoint")
    r = stack.http.post(f"/jobs/{long['id']}/cancel").json()
    assert r["status"] in ("cancelling", "cancelled") and r["cancel_requested"]
    done = stack.wait_status(long["id"], "cancelled", timeout=120)
    assert done["step"] < 400 and done["finished_at"]
    assert stack.http.get(f"/jobs/{long['id']}/checkpoints").json(), "the last checkpoint is kept"
    statuses = [e["data"]["status"] for e in stack.events(long["id"], type="status") if "status" in e["data"]]
    assert statuses[-3:] == ["running", "cancelling", "cancelled"]
    for job_id in (never["id"], lost["id"]):  # their messages were delivered (or lost): they never started
        events = stack.events(job_id)
        assert not any(e["data"].get("status") == "running" for e in events), events
        assert stack.job(job_id)["status"] == "cancelled"


def test_killed_worker_is_reaped_and_the_job_resumes_from_its_checkpoint(stack):
    job = stack.submit(tiny_job(stack, stack.dataset_id, max_steps=12, save_steps=2))
    wait_for(lambda: any(c["step"] >= 2 for c in stack.http.get(f"/jobs/{job['id']}/checkpoints").json())
             and (stack.job(job["id"])["step"] or 0) >= 3, JOB_TIMEOUT, "a checkpoint and step 3")
    stack.workers["worker"].kill(signal.SIGKILL)  # kill -9 the worker and its training child
    killed = stack.job(job["id"])
    assert killed["status"] == "running" and killed["step"] < 12, "killed mid-training"
    replacement = stack.start_worker("worker", stack.queue)
    stack.wait_ready(replacement)

    done = stack.wait_status(job["id"], "succeeded")
    assert done["resumes"] == 1 and done["step"] == 12
    events = stack.events(job["id"])
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    lost = [e for e in events if "lost" in e["message"] and e["level"] == "warning"]
    assert lost and lost[0]["data"]["status"] == "queued"
    resumed = [e["data"]["resumed_from"] for e in events if "resumed_from" in e["data"]]
    assert resumed and resumed[0] >= 2, [e["message"] for e in events]
    statuses = [e["data"]["status"] for e in events if e["type"] == "status" and "status" in e["data"]]
    assert statuses == ["validating_files", "queued", "running", "queued", "running", "succeeded"]
    at = next(i for i, e in enumerate(events) if "resumed_from" in e["data"])
    steps_after = [e["data"]["step"] for e in events[at:] if e["type"] == "metrics"]
    assert steps_after == list(range(resumed[0] + 1, 13))  # it went on from the checkpoint, not from step 1


def test_injected_oom_shows_the_downgrade_and_final_settings(stack):
    queue = f"{stack.queue}.oom"
    oom_worker = stack.start_worker("oom-worker", queue, TRINITY_INJECT_OOM="1")
    try:
        stack.wait_ready(oom_worker)
        body = tiny_job(stack, stack.dataset_id, max_steps=2)
        body["lora"]["use_dora"] = True  # the ladder's dora_off rung is the first that changes anything here
        job = stack.submit(body, queue=queue)
        done = stack.wait_status(job["id"], "succeeded")
    finally:
        oom_worker.stop(grace=5)
    downgrades = [e for e in stack.events(job["id"], level="warning") if "rung" in e["data"]]
    assert [d["data"]["rung"] for d in downgrades] == ["dora_off"]
    assert downgrades[0]["data"]["settings"]["use_dora"] is False
    assert done["rung"] == "dora_off" and done["settings"]["use_dora"] is False
    assert [a["outcome"] for a in done["attempts"]] == ["oom", "ok"]
    assert done["result"]["final_settings"] == done["settings"]
