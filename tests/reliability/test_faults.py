"""Faults with real processes: kill -9 of the worker (repeatedly, at random moments), a Redis
restart mid-queue (a private redis-server with AOF, as in docker-compose), the API killed during
an upload and a download, a full disk while a job writes its artifacts (a 6 MB tmpfs), and OOMs
injected into the service's worker (TRINITY_TEST_SEAMS + TRINITY_INJECT_OOM)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import alpaca_rows
from tests.service.live import JOB_TIMEOUT, tiny_job, wait_for

from .conftest import make_stack

pytestmark = pytest.mark.slow
KILLS = int(os.environ.get("TRINITY_TEST_KILLS", "10"))


def upload(stack, rows: int = 40) -> str:
    r = stack.http.post("/datasets", files={"file": ("train.jsonl", alpaca_rows(rows))})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def ensure_worker(stack, name: str = "worker", queue: str | None = None, **env: str):
    proc = stack.workers.get(name)
    if proc is None or not proc.alive():
        proc = stack.start_worker(name, queue or stack.queue, **env)
        stack.wait_ready(proc)
    return proc


# ── kill -9 of the worker, repeatedly ────────────────────────────────────────────────────────

def test_worker_killed_at_random_moments_resumes_each_time(rstack):
    """One job (30 steps, a checkpoint every 3); the worker is killed -9 KILLS times at random
    moments while the job runs and restarted; the reaper (stale after 5 s) re-queues it each time."""
    from safetensors import safe_open

    from trinity_core.spec import JobSpec

    seed = int(os.environ.get("TRINITY_TEST_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    ensure_worker(rstack)
    job = rstack.submit(tiny_job(rstack, upload(rstack), max_steps=30, save_steps=3))
    kills, log = 0, []
    # kill points: KILLS distinct steps, then a random 0-1 s more (mid-step, mid-save, mid-event write);
    # a resumed run starts at its checkpoint, so steps between a checkpoint and a kill are trained twice
    targets = sorted(rng.sample(range(1, 30), KILLS))
    for target in targets:
        # running again since the last kill (resumes == kills: re-queued and claimed by the new worker),
        # not the killed run's row, which says "running" until the reaper finds it stale
        wait_for(lambda: (j := rstack.job(job["id"]))["status"] == "succeeded"
                 or (j["status"] == "running" and j["resumes"] == kills and (j["step"] or 0) >= target),
                 JOB_TIMEOUT, f"step {target}", interval=0.1)
        time.sleep(rng.uniform(0, 1.0))
        before = rstack.job(job["id"])
        if before["status"] != "running":
            break
        rstack.workers["worker"].kill(signal.SIGKILL)
        rstack.workers["worker"].stop(grace=0)
        kills += 1
        ckpts = [c["step"] for c in rstack.http.get(f"/jobs/{job['id']}/checkpoints").json()]
        log.append({"kill": kills, "step": before["step"], "checkpoints": ckpts})
        ensure_worker(rstack)
    done = rstack.wait_status(job["id"], "succeeded")
    print(f"\nseed {seed}: {kills} kills: {json.dumps(log)}")
    assert kills >= min(KILLS, 3), f"the job finished after only {kills} kills (seed {seed})"
    assert done["step"] == done["total_steps"] == 30
    assert done["resumes"] == kills, (done["resumes"], kills)

    events = rstack.events(job["id"])
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    resumed = [e["data"]["resumed_from"] for e in events if "resumed_from" in e["data"]]
    # checkpoints: every save_steps (3) and at every evaluation (train.eval_steps, 10 by default)
    eval_steps = JobSpec().train.eval_steps
    assert all(r % 3 == 0 or r % eval_steps == 0 for r in resumed) and resumed == sorted(resumed), resumed
    # the loss history: after each (re)start, steps go on from the checkpoint, one by one, to 30
    runs, current = [], None
    for e in events:
        if e["type"] == "status" and e["data"].get("status") == "running":
            current = []
            runs.append(current)
        elif e["type"] == "metrics" and current is not None:
            current.append(e["data"]["step"])
    for steps in runs:
        assert steps == list(range(steps[0], steps[0] + len(steps))) if steps else True, runs
    final = {}
    for e in events:
        if e["type"] == "metrics":
            final[e["data"]["step"]] = e["data"]["loss"]
    assert sorted(final) == list(range(1, 31)), sorted(final)
    assert all(v > 0 for v in final.values())
    starts = [s[0] for s in runs if s]
    assert starts[0] == 1 and all(s - 1 in [0, *resumed] for s in starts), (starts, resumed)

    adapter = Path(rstack.env["TRINITY_DATA_DIR"]) / "jobs" / job["id"] / "adapter" / "adapter_model.safetensors"
    with safe_open(adapter, "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    a = [s for k, s in shapes.items() if "lora_A" in k]
    b = [s for k, s in shapes.items() if "lora_B" in k]
    assert a and len(a) == len(b) and all(s[0] == 8 for s in a) and all(s[1] == 8 for s in b), shapes
    config = json.loads((Path(rstack.model) / "config.json").read_text())
    layers = config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers")
    assert len(a) % layers == 0, (len(a), layers)


# ── Redis restarted mid-queue ────────────────────────────────────────────────────────────────

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnRedis:
    def __init__(self, root: Path):
        self.port, self.dir = _free_port(), root / "redis"
        self.dir.mkdir()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--appendonly", "yes",
             "--appendfsync", "everysec", "--dir", str(self.dir), "--save", ""],
            stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        import redis

        wait_for(lambda: self._ping(redis), 20, "redis-server")

    def _ping(self, redis) -> bool:  # noqa: ANN001
        try:
            return redis.Redis(port=self.port).ping()
        except redis.ConnectionError:
            return False

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def test_redis_killed_and_restarted_mid_queue_loses_no_job(tiny_model_dir, tmp_path):
    if not shutil.which("redis-server"):
        pytest.skip("no redis-server binary")
    own = OwnRedis(tmp_path)
    own.start()
    stack = make_stack(tmp_path / "stack", tiny_model_dir, broker_url=f"redis://127.0.0.1:{own.port}/0")
    try:
        dataset_id = upload(stack)
        stack.wait_ready(stack.workers["worker"])
        first = stack.submit(tiny_job(stack, dataset_id, max_steps=6))
        stack.wait_status(first["id"], "running")  # in flight
        queued = [stack.submit(tiny_job(stack, dataset_id, max_steps=2)) for _ in range(4)]
        time.sleep(1.5)  # appendfsync everysec
        own.kill()
        time.sleep(1)
        own.start()  # same --dir: the AOF is replayed
        ids = [first["id"], *[j["id"] for j in queued]]
        for job_id in ids:
            stack.wait_status(job_id, "succeeded")
        for job_id in ids:
            statuses = [e["data"]["status"] for e in stack.events(job_id, type="status") if "status" in e["data"]]
            assert statuses.count("succeeded") == 1 and statuses[-1] == "succeeded", statuses
    finally:
        stack.close()
        own.kill()


def test_redis_restarted_without_its_data_reaper_resends(tiny_model_dir, tmp_path):
    """Worst case: Redis comes back empty (AOF deleted). The reaper sees the messages are missing
    and sends them again; every queued job still runs exactly once."""
    if not shutil.which("redis-server"):
        pytest.skip("no redis-server binary")
    own = OwnRedis(tmp_path)
    own.start()
    stack = make_stack(tmp_path / "stack", tiny_model_dir, worker=False,
                       broker_url=f"redis://127.0.0.1:{own.port}/0")
    try:
        dataset_id = upload(stack)
        jobs = [stack.submit(tiny_job(stack, dataset_id, max_steps=2)) for _ in range(3)]
        own.kill()
        shutil.rmtree(own.dir)
        own.dir.mkdir()
        own.start()
        worker = stack.start_worker("worker", stack.queue)
        stack.wait_ready(worker)
        for job in jobs:
            stack.wait_status(job["id"], "succeeded")
            assert any("not in the broker" in e["message"] for e in stack.events(job["id"]))
    finally:
        stack.close()
        own.kill()


# ── API killed during an upload and a download ──────────────────────────────────────────────

def test_api_killed_during_upload_and_download_shows_nothing_half_written(rstack):
    data_dir = Path(rstack.env["TRINITY_DATA_DIR"])
    before = {d["id"] for d in rstack.http.get("/datasets", params={"limit": 100}).json()["data"]}
    boundary = "killbound"
    sent = threading.Event()

    def slow_body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"t.jsonl\"\r\n\r\n").encode()
        for i in range(400):
            yield alpaca_rows(50)
            if i == 5:
                sent.set()
            time.sleep(0.02)
        yield f"\r\n--{boundary}--\r\n".encode()

    outcome = {}

    def post():
        try:
            outcome["r"] = httpx.post(rstack.base + "/datasets", content=slow_body(), timeout=60,
                                      headers={"Authorization": f"Bearer {rstack.key}",
                                               "Content-Type": f"multipart/form-data; boundary={boundary}"})
        except httpx.HTTPError as error:
            outcome["error"] = error

    t = threading.Thread(target=post)
    t.start()
    assert sent.wait(30)
    rstack.api.kill(signal.SIGKILL)
    t.join(60)
    assert "error" in outcome, outcome  # the client saw the connection die, not a 201
    rstack.api.stop(grace=0)
    rstack.start_api()
    after = {d["id"] for d in rstack.http.get("/datasets", params={"limit": 100}).json()["data"]}
    assert after == before
    stored = [p for p in (data_dir / "datasets").iterdir() if p.name != ".tmp"]
    assert {p.name for p in stored} == before, "only committed datasets have a directory"
    leftovers = list((data_dir / "datasets" / ".tmp").glob("upload-*"))
    print(f"\ntemp files left in datasets/.tmp after the kill: {len(leftovers)}")
    # the reaper (a worker's thread) removes an upload's temp file once it is an hour old (aged by hand)
    ensure_worker(rstack)
    for path in leftovers:
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    wait_for(lambda: not list((data_dir / "datasets" / ".tmp").glob("upload-*")), 30, "the reaper to remove it")

    # a download cut by the API's death resumes with Range and gives the right bytes
    job = rstack.submit(tiny_job(rstack, upload(rstack)), queue=f"{rstack.queue}.parked")
    from trinity_core.artifacts import entry, write_manifest

    workdir = data_dir / "jobs" / job["id"]
    (workdir / "adapter").mkdir(parents=True)
    payload = os.urandom(48 * 2**20)
    (workdir / "adapter" / "big.bin").write_bytes(payload)
    write_manifest(workdir, [entry(workdir, workdir / "adapter" / "big.bin", name="big.bin", kind="adapter")])
    url = f"/jobs/{job['id']}/artifacts/big.bin"
    got = bytearray()
    with pytest.raises(httpx.HTTPError):
        with rstack.http.stream("GET", url) as r:
            assert r.status_code == 200 and int(r.headers["content-length"]) == len(payload)
            for chunk in r.iter_raw(64 * 1024):
                got += chunk
                if len(got) > 4 * 2**20 and rstack.api.alive():
                    rstack.api.kill(signal.SIGKILL)
    assert 0 < len(got) < len(payload)
    rstack.api.stop(grace=0)
    rstack.start_api()
    listed = rstack.http.get(f"/jobs/{job['id']}/artifacts").json()
    assert [a["name"] for a in listed] == ["big.bin"] and listed[0]["size"] == len(payload)
    rest = rstack.http.get(url, headers={"Range": f"bytes={len(got)}-", "If-Range": f'"{listed[0]["sha256"]}"'})
    assert rest.status_code == 206 and bytes(got) + rest.content == payload


# ── disk full while writing artifacts ────────────────────────────────────────────────────────

def _tmpfs_over_jobs(rstack, size: str) -> Path:
    """A small tmpfs over jobs/ (earlier jobs' workdirs are hidden until the umount; nothing of
    theirs is used meanwhile); skips where mounting is not allowed."""
    mount = Path(rstack.env["TRINITY_DATA_DIR"]) / "jobs"
    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode()}")
    return mount


def test_a_job_whose_export_cannot_fit_the_disk_is_refused_before_training(rstack):
    """The host pre-flight (trinity_core/export/resources.py) sees a 6 MB disk: the job fails before any step."""
    dataset_id = upload(rstack)
    ensure_worker(rstack)
    body = tiny_job(rstack, dataset_id, export=True, max_steps=2)
    mount = _tmpfs_over_jobs(rstack, "6m")
    try:
        job = rstack.submit(body)
        final = rstack.wait_status(job["id"], "failed", "succeeded")
        error = final["error"] or {}
        assert final["status"] == "failed" and error["code"] == "insufficient_disk", final
        assert "export.gguf false" in error["message"] and error["param"] == "export", error
        assert not any(e["data"].get("step") for e in rstack.events(job["id"])), "no training step ran"
        assert rstack.env["TRINITY_DATA_DIR"] not in json.dumps(final), "no server paths in the API"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_while_writing_artifacts_fails_cleanly(rstack):
    """The pre-flight passes, then something else fills the disk while the job trains (6 MB left:
    the checkpoints fit, the merged model + GGUF do not): ENOSPC in the export fails the job
    cleanly, and every artifact listed is whole."""
    dataset_id = upload(rstack)
    ensure_worker(rstack)
    body = tiny_job(rstack, dataset_id, export=True, max_steps=2)
    mount = _tmpfs_over_jobs(rstack, "64m")
    try:
        job = rstack.submit(body)
        wait_for(lambda: rstack.job(job["id"]).get("stage") in ("train", "merge", "gguf"), 300, "training")
        free = shutil.disk_usage(mount).free
        (mount / "filler").write_bytes(b"\0" * max(0, free - 6 * 2**20))  # another process's data
        final = rstack.wait_status(job["id"], "failed", "succeeded")
        error = final["error"] or {}
        print(f"\ndisk full: status {final['status']}, error {json.dumps(error)[:400]}")
        assert final["status"] == "failed", final
        assert error.get("code") and error.get("message")
        assert error["code"] == "artifact_write_failed" and "disk full" in error["message"], error
        assert (error.get("details") or {}).get("errno") == "ENOSPC", error
        assert rstack.env["TRINITY_DATA_DIR"] not in json.dumps(final), "no server paths in the API"
        for artifact in rstack.http.get(f"/jobs/{job['id']}/artifacts").json():
            r = rstack.http.get(f"/jobs/{job['id']}/artifacts/{artifact['name']}")
            assert r.status_code == 200 and len(r.content) == artifact["size"], artifact
            import hashlib

            assert hashlib.sha256(r.content).hexdigest() == artifact["sha256"], artifact
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# ── injected OOM through the service ─────────────────────────────────────────────────────────

@pytest.mark.parametrize("ooms, rung", [(1, "seq_2048"), (5, None)])
def test_injected_oom_through_the_service(rstack, ooms, rung):
    queue = f"{rstack.queue}.oom"
    proc = rstack.start_worker(f"oom{ooms}", queue, TRINITY_TEST_SEAMS="true", TRINITY_INJECT_OOM=str(ooms))
    try:
        rstack.wait_ready(proc)
        body = tiny_job(rstack, upload(rstack), max_steps=2)
        body["model"]["max_seq_length"] = 4096
        body["lora"].update(r=64, use_dora=True)  # every rung changes something: seq_2048, r_32, dora_off, targets_qv
        job = rstack.submit(body, queue=queue)
        done = rstack.wait_status(job["id"], "succeeded", "failed")
    finally:
        proc.stop(grace=5)
    if rung is not None:
        assert done["status"] == "succeeded", done["error"]
        assert done["rung"] == rung and done["settings"]["max_seq_length"] == 2048 and done["settings"]["r"] == 64
        assert [a["outcome"] for a in done["attempts"]] == ["oom", "ok"]
    else:
        assert done["status"] == "failed" and done["error"]["code"] == "oom_ladder_exhausted", done["error"]
        rungs = [a.get("rung") for a in done["attempts"]]
        assert rungs == ["recipe", "seq_2048", "r_32", "dora_off", "targets_qv"], done["attempts"]
        assert all(a.get("outcome") == "oom" for a in done["attempts"]), done["attempts"]
