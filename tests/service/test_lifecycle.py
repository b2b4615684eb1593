"""End to end with real parts: uvicorn and Celery worker processes, Redis (DB 15, a queue name
unique to this session), a SQLite file (``TRINITY_TEST_SERVICE_DB=postgresql`` switches to a
fresh PostgreSQL database), the tiny Gemma-3 trained for a few steps, httpx as the client.

One worker serves the module; the OOM test adds a second one (``TRINITY_TEST_SEAMS`` + ``TRINITY_INJECT_OOM`` in
the worker's environment) on its own queue. Timeouts are generous: the 2 cores are shared.
"""

from __future__ import annotations

import hashlib
import json
import signal

import httpx
import pytest

from cli.client import sse_blocks

from .live import JOB_TIMEOUT, Stack, running_stack, tiny_job, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory, redis_client):
    yield from running_stack(tiny_model_dir, tmp_path_factory.mktemp("service"))


def read_sse(stack: Stack, job_id: str, *, last_event_id: int | None = None, stop_after: int | None = None):
    """Events from the SSE stream (and the end event, if reached); stop_after disconnects early."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    events, end = [], None
    with stack.http.stream("GET", f"/jobs/{job_id}/events/stream", headers=headers,
                           timeout=httpx.Timeout(10, read=120)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for block in sse_blocks(r.iter_lines()):
            if block.get("event") == "end":
                end = json.loads(block["data"])
                break
            if "data" in block:
                event = json.loads(block["data"])
                assert int(block["id"]) == event["seq"]
                events.append(event)
                if stop_after and len(events) >= stop_after:
                    break
    return events, end


def endings(events: list[dict]) -> list[dict]:
    """Status events that announce a terminal status (in their data or as their whole message)."""
    terminal = {"succeeded", "failed", "cancelled"}
    return [e for e in events if e["type"] == "status" and terminal & {e["data"].get("status"), e["message"]}]


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
    assert endings(streamed) == streamed[-1:] and done["stage"] == "done"  # one terminal event, the last
    assert streamed[-2]["message"].startswith("finished: ")  # run_job's last word is a message
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

    def message_back() -> bool:  # the reaper commits its event, then sends: the message follows within moments
        waiting = [json.loads(m)["headers"]["id"] for m in redis_client.lrange(stack.queue, 0, -1)]
        return any(task_id.startswith(lost["id"]) for task_id in waiting)

    wait_for(message_back, 10, "the re-sent message in the broker's queue")  # its message is back
    assert stack.http.post(f"/jobs/{lost['id']}/cancel").json()["status"] == "cancelled"

    wait_for(lambda: stack.http.get(f"/jobs/{long['id']}/checkpoints").json(), JOB_TIMEOUT, "a checkpoint")
    r = stack.http.post(f"/jobs/{long['id']}/cancel").json()
    assert r["status"] in ("cancelling", "cancelled") and r["cancel_requested"]
    done = stack.wait_status(long["id"], "cancelled", timeout=120)
    assert done["step"] < 400 and done["finished_at"]
    assert stack.http.get(f"/jobs/{long['id']}/checkpoints").json(), "the last checkpoint is kept"
    statuses = [e["data"]["status"] for e in stack.events(long["id"], type="status") if "status" in e["data"]]
    assert statuses[-3:] == ["running", "cancelling", "cancelled"]
    assert [e["data"]["status"] for e in endings(stack.events(long["id"]))] == ["cancelled"]
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
    oom_worker = stack.start_worker("oom-worker", queue, TRINITY_TEST_SEAMS="true", TRINITY_INJECT_OOM="1")
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
