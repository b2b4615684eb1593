"""The task, the runner and the reaper, in-process, on SQLite and PostgreSQL, with a scripted
``run_job`` (real training is in test_lifecycle.py) and the real Redis broker for the reaper."""

from __future__ import annotations

import json
import os
import threading
import time
from types import SimpleNamespace

import pytest

from trinity_service import crud
from trinity_service.db import session_scope
from trinity_service.models import Job
from trinity_service.settings import get_settings
from trinity_service.states import JobStatus as S
from trinity_core.errors import GpuMemoryNotReleased, HubDownloadError, JobCancelled, OOMLadderExhausted
from trinity_core.events import Emitter

SPEC = {"model": {"name_or_path": "org/m", "max_seq_length": 256}, "lora": {"r": 16, "alpha": 32},
        "data": {"hub": "org/data"}, "export": {"merge": False, "gguf": False, "evaluate": False}}


@pytest.fixture
def fast(settings, monkeypatch):
    monkeypatch.setenv("TRINITY_HEARTBEAT_INTERVAL_S", "0.2")
    monkeypatch.setenv("TRINITY_CANCEL_POLL_S", "0.05")
    get_settings.cache_clear()
    return get_settings()


@pytest.fixture
def script(monkeypatch):
    """Replace run_job with ``script.fn(spec, workdir, emit, should_stop, on_step)``; the
    ``RunOptions`` it was given land in ``script.options``."""
    import trinity_core.pipeline

    holder = SimpleNamespace(fn=None, calls=0, options=[])

    def fake_run_job(spec, workdir, on_event=None, *, options=None, should_stop=None, on_step=None):
        holder.calls += 1
        holder.options.append(options)
        workdir.mkdir(parents=True, exist_ok=True)
        return holder.fn(spec, workdir, Emitter(on_event), should_stop, on_step)

    monkeypatch.setattr(trinity_core.pipeline, "run_job", fake_run_job)
    return holder


def queued_job(spec=SPEC, queue="gpu.default") -> str:
    with session_scope() as s:
        job, _ = crud.create_job(session=s, tenant="t", spec=spec, queue=queue, dataset_id=None)
        crud.transition(session=s, job_id=job.id, to=S.queued)
        return job.id


def run_task(job_id):
    from worker.tasks import run_training

    return run_training.apply(args=[job_id]).get(propagate=False)


def load(job_id) -> Job:
    with session_scope() as s:
        return crud.get_job(session=s, tenant=None, job_id=job_id)


def events(job_id, **kw):
    with session_scope() as s:
        return crud.list_events(session=s, job_id=job_id, limit=1000, **kw)[0]


def result(status="succeeded", steps=3):
    settings = {"max_seq_length": 256, "r": 16, "use_dora": False, "target_modules": ["q_proj"]}
    data = {"status": status, "attempts": [{"rung": "recipe", "outcome": "oom"}, {"rung": "dora_off", "outcome": "ok"}],
            "final_rung": "dora_off", "final_settings": settings, "global_step": steps,
            "loss_history": [{"step": 1, "loss": 2.0}], "workdir": "/x"}
    return SimpleNamespace(to_dict=lambda: data)


def test_success_records_events_progress_and_result(fast, script):
    def fn(spec, workdir, emit, should_stop, on_step):
        assert spec.data.hub == "org/data"
        emit.status("training", stage="train")
        low = {"max_seq_length": 256, "r": 16, "use_dora": False, "target_modules": ["q_proj"]}
        emit("out of memory: stepping down to rung 'dora_off'", level="warning", type="ladder", rung="dora_off",
             settings=low, attempts=[{"rung": "recipe", "outcome": "oom"},
                                     {"rung": "dora_off", "settings": low, "outcome": "running"}])
        mid = load(job_id)
        assert (mid.rung, mid.settings["use_dora"], mid.stage) == ("dora_off", False, "train")
        assert [a["outcome"] for a in mid.attempts] == ["oom", "running"]
        for step in (1, 2, 3):
            on_step(step)
            emit.metrics(f"step {step}/3", step=step, total_steps=3, loss=3.0 - step, tokens_per_s=50.0, eta_s=3 - step)
            assert not should_stop()
        (workdir / "adapter").mkdir()
        (workdir / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
        emit("adapter saved", where=workdir / "adapter")  # not JSON by itself: stored as a string
        return result()

    script.fn = fn
    job_id = queued_job()
    assert run_task(job_id) == "succeeded"
    job = load(job_id)
    assert job.status == S.succeeded and job.step == 3 and job.total_steps == 3 and job.loss == 0.0
    assert job.rung == "dora_off" and job.settings["use_dora"] is False and job.eta_s == 0.0
    assert [a["outcome"] for a in job.attempts] == ["oom", "ok"] and job.result["global_step"] == 3
    seqs = [e.seq for e in events(job_id)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert [e.data.get("status") for e in events(job_id, types=["status"])][-1] == "succeeded"
    assert [e.data for e in events(job_id) if e.message == "adapter saved"] == [
        {"where": str(fast.jobs_dir / job_id / "adapter")}]
    from trinity_core.artifacts import read_json
    manifest = read_json(fast.jobs_dir / job_id / "artifacts.json")
    assert manifest is not None  # the core's manifest exists for the API to serve


def test_the_row_copies_the_ladders_attempt_list(fast):
    """The ladder reports its whole attempt list in ``ladder`` events; the worker copies it (and the
    rung now training, when the event names one) and reads nothing else into it."""
    from trinity_core.events import Event
    from worker.runner import Recorder, Run

    recorder = Recorder(Run("job", 1, SPEC, None, fast.jobs_dir / "job"))

    def ladder(level="info", **data):
        return recorder._progress(Event(0, 0.0, level, "ladder", "l", data))

    skipped = [{"rung": "recipe", "outcome": "skipped", "estimate_gib": 99.0}]
    assert ladder("warning", attempts=skipped, skipped="recipe") == {"attempts": skipped}  # pre-flight skip
    low = {"max_seq_length": 2048, "r": 64, "use_dora": True, "target_modules": ["q_proj"]}
    attempts = [*skipped, {"rung": "seq_2048", "outcome": "oom"}, {"rung": "r_32", "outcome": "running"}]
    assert ladder("warning", rung="r_32", settings={**low, "r": 32}, attempts=attempts) == {
        "rung": "r_32", "settings": {**low, "r": 32}, "attempts": attempts}
    # a warning that merely names a rung is not the ladder's: nothing is copied
    assert recorder._progress(Event(0, 0.0, "warning", "message", "w", {"rung": "r_32", "settings": low})) == {}


def test_the_worker_runs_with_the_service_run_options(settings, script, monkeypatch):
    """RunOptions come from the service settings: TRINITY_FAST_DORA, TRINITY_COMPILED_LAYERS, and the injected-OOM
    seam only with TRINITY_TEST_SEAMS (without it the settings refuse to load)."""
    from trinity_core.options import RunOptions

    monkeypatch.setenv("TRINITY_FAST_DORA", "false")
    monkeypatch.setenv("TRINITY_COMPILED_LAYERS", "false")
    monkeypatch.setenv("TRINITY_INJECT_OOM", "2")
    get_settings.cache_clear()
    with pytest.raises(ValueError, match="TRINITY_TEST_SEAMS"):
        get_settings()
    monkeypatch.setenv("TRINITY_TEST_SEAMS", "true")
    get_settings.cache_clear()
    script.fn = lambda *a: result()
    run_task(queued_job())
    assert script.options == [RunOptions(fast_dora=False, compiled_layers=False, test_seams=True, inject_oom=2)]
    get_settings.cache_clear()


def test_cancel_stops_at_a_step_boundary(fast, script):
    def fn(spec, workdir, emit, should_stop, on_step):
        for step in range(1, 1000):
            on_step(step)
            if step == 3:
                with session_scope() as s:
                    assert crud.request_cancel(session=s, job=load(job_id)).status == S.cancelling
            if should_stop():
                details = {"attempts": [{"rung": "recipe", "outcome": "cancelled"}], "global_step": step}
                raise JobCancelled(f"stopped at step {step}; checkpoint kept", details=details)
            time.sleep(0.01)
        raise AssertionError("never stopped")

    script.fn = fn
    job_id = queued_job()
    assert run_task(job_id) == "cancelled"
    job = load(job_id)
    assert job.status == S.cancelled and job.attempts[0]["outcome"] == "cancelled"
    assert [e.data["status"] for e in events(job_id, types=["status"])][-2:] == ["cancelling", "cancelled"]


def test_trinity_errors_fail_with_their_code(fast, script):
    attempts = [{"rung": "recipe", "outcome": "oom"}, {"rung": "targets_qv", "outcome": "oom"}]

    def fn(*_):
        raise OOMLadderExhausted("out of memory on every rung", details=attempts)

    script.fn = fn
    job_id = queued_job()
    assert run_task(job_id) == "failed"
    job = load(job_id)
    assert job.error["code"] == "oom_ladder_exhausted" and job.error["message"] == "out of memory on every rung"
    assert job.attempts == attempts and script.calls == 1  # never retried
    assert events(job_id)[-1].level == "error"


def test_a_crash_fails_the_job_with_internal_error(fast, script):
    def fn(*_):
        raise KeyError("boom")

    script.fn = fn
    job_id = queued_job()
    assert run_task(job_id) == "failed"
    assert load(job_id).error["code"] == "internal_error" and "boom" in load(job_id).error["message"]


def test_a_real_run_that_fails_has_one_terminal_event(fast, tiny_model_dir, tmp_path):
    """The real run_job (no script): it fails in its data stage; the worker's transition is the one ending."""
    spec = {**SPEC, "model": {"name_or_path": str(tiny_model_dir), "max_seq_length": 64},
            "data": {"path": str(tmp_path / "missing.jsonl")}}
    job_id = queued_job(spec)
    assert run_task(job_id) == "failed" and load(job_id).error["code"] == "invalid_dataset"
    recorded = events(job_id)
    endings = [e for e in recorded if e.type == "status" and {e.data.get("status"), e.message} & {"succeeded", "failed",
                                                                                                   "cancelled"}]
    assert endings == recorded[-1:] and recorded[-1].data["status"] == "failed"


def test_retryable_errors_are_retried_then_fail(fast, script):
    def fn(*_):
        raise HubDownloadError("hub unreachable")

    script.fn = fn
    job_id = queued_job()
    run_task(job_id)  # eager mode runs the retry at once; TRINITY_MAX_RETRIES=1
    job = load(job_id)
    assert script.calls == 2 and job.status == S.failed and job.error["code"] == "hub_download_failed"
    statuses = [e.data["status"] for e in events(job_id, types=["status"])]
    assert statuses == ["validating_files", "queued", "running", "queued", "running", "failed"]
    assert any("retry 1" in e.message and e.level == "warning" for e in events(job_id))


def test_retryable_error_while_cancelling_is_not_retried(fast, script):
    def fn(*_):
        with session_scope() as s:
            crud.request_cancel(session=s, job=load(job_id))
        raise HubDownloadError("hub unreachable")

    script.fn = fn
    job_id = queued_job()
    assert run_task(job_id) == "failed" and script.calls == 1
    assert load(job_id).error["code"] == "hub_download_failed"


def test_retryable_error_then_success(fast, script):
    def fn(*_):
        if script.calls == 1:
            raise HubDownloadError("hub hiccup")
        return result()

    script.fn = fn
    job_id = queued_job()
    run_task(job_id)
    assert load(job_id).status == S.succeeded and load(job_id).run_token == 2


def test_gpu_memory_not_released_requeues_at_once_beyond_max_retries(fast, script):
    """The ladder's escape to a fresh process: re-queued with no delay, not counted against
    TRINITY_MAX_RETRIES (1 here) since each run resumes one rung further down."""
    def fn(*_):
        if script.calls <= 2:
            raise GpuMemoryNotReleased("5.7 GiB stayed allocated", details={"next_rung": "r_32"})
        return result()

    script.fn = fn
    job_id = queued_job()
    run_task(job_id)
    job = load(job_id)
    assert script.calls == 3 and job.status == S.succeeded and job.run_token == 3
    requeues = [e for e in events(job_id) if "stayed allocated" in e.message]
    assert len(requeues) == 2 and all("in 0 s" in e.message for e in requeues)


def test_duplicate_deliveries_are_harmless(fast, script):
    script.fn = lambda *a: result()
    job_id = queued_job()
    assert run_task(job_id) == "succeeded"
    assert run_task(job_id) == "skipped" and script.calls == 1


def test_heartbeat_runs_without_steps(fast, script):
    beats = []

    def fn(*_):
        for _ in range(5):  # e.g. loading a model: no step callbacks for a while
            beats.append(load(job_id).heartbeat_at)
            time.sleep(0.25)
        return result()

    script.fn = fn
    job_id = queued_job()
    run_task(job_id)
    assert len(set(beats)) >= 3 and beats == sorted(beats)


def test_a_run_that_lost_its_job_stops_and_writes_nothing(fast, script):
    def fn(spec, workdir, emit, should_stop, on_step):
        with session_scope() as s:  # the reaper thought this worker dead and another one took over
            crud.requeue_lost(session=s, job=load(job_id), heartbeat_before=time.time() + 60, max_resumes=3)
            crud.claim_job(session=s, job_id=job_id, worker="other")
        emit("zombie event")
        for _ in range(100):
            if should_stop():
                raise JobCancelled("stopped")
            time.sleep(0.01)
        raise AssertionError("never stopped")

    script.fn = fn
    job_id = queued_job()
    assert run_task(job_id) == "lost"
    job = load(job_id)
    assert job.status == S.running and job.worker == "other" and job.run_token == 2
    assert not [e for e in events(job_id) if e.message == "zombie event"]


# ── reaper, with the real Redis broker ───────────────────────────────────────────────────────

@pytest.fixture
def queue(redis_client, fast):
    name = f"test.reaper.{time.time_ns()}"
    yield name
    redis_client.delete(name)


def broker_ids(redis_client, queue):
    return [json.loads(raw)["headers"]["id"] for raw in redis_client.lrange(queue, 0, -1)]


def age(job_id, **fields):
    with session_scope() as s:
        s.execute(Job.__table__.update().where(Job.id == job_id).values(**fields))
        s.commit()


def test_reaper_resends_a_queued_job_missing_from_the_broker(queue, redis_client, monkeypatch):
    from trinity_service.queue import enqueue
    from worker import reaper

    lost, kept = queued_job(queue=queue), queued_job(queue=queue)
    with session_scope() as s:
        enqueue(session=s, job=load(kept))
    old = time.time() - 3600
    age(lost, enqueued_at=None, queued_at=old)
    age(kept, enqueued_at=old)
    counts = reaper.sweep()
    assert counts["resent"] >= 1
    ids = broker_ids(redis_client, queue)
    assert load(lost).task_id in ids and ids.count(load(kept).task_id) == 1  # present one not re-sent
    assert any("not in the broker" in e.message for e in events(lost))
    redis_client.delete(queue)  # "Redis restarted": every message is gone
    age(lost, enqueued_at=old)
    age(kept, enqueued_at=old)
    reaper.sweep()
    assert set(broker_ids(redis_client, queue)) == {load(lost).task_id, load(kept).task_id}


def test_reaper_requeues_a_dead_workers_job(queue, redis_client):
    from worker import reaper

    job_id = queued_job(queue=queue)
    with session_scope() as s:
        crud.claim_job(session=s, job_id=job_id, worker="dead")
    reaper.sweep()
    assert load(job_id).status == S.running  # heartbeat is fresh
    age(job_id, heartbeat_at=time.time() - 3600)
    counts = reaper.sweep()
    job = load(job_id)
    assert counts["requeued"] >= 1 and job.status == S.queued and job.resumes == 1
    assert broker_ids(redis_client, queue) == [job.task_id]
    assert any("re-queued to resume" in e.message for e in events(job_id))


def test_reaper_admits_a_job_left_validating(queue, redis_client):
    from worker import reaper

    with session_scope() as s:
        job, _ = crud.create_job(session=s, tenant="t", spec=SPEC, queue=queue, dataset_id=None)
    age(job.id, created_at=time.time() - 3600)
    reaper.sweep()
    assert load(job.id).status == S.queued and broker_ids(redis_client, queue) == [load(job.id).task_id]


def test_reaper_thread_sweeps(fast, monkeypatch):
    from worker import reaper

    calls = []
    monkeypatch.setattr(reaper, "sweep", lambda settings: calls.append(1))
    stop = reaper.start_thread(fast.model_copy(update={"reaper_interval_s": 0.05}))
    time.sleep(0.5)
    stop.set()
    assert len(calls) >= 3


def test_a_fork_waits_for_the_sweep_in_progress(queue, monkeypatch):
    """The worker's main process forks each job's child beside the reaper thread: a child forked mid-sweep would
    start with the locks the sweep held, held forever (worker/reaper.py). The fork waits; the child's guard is free."""
    from worker import reaper

    reaper.install_fork_guard()
    inside, leave = threading.Event(), threading.Event()

    def slow_last_step(tmp_dir, *, before):  # the sweep's last step, held open
        inside.set()
        leave.wait(10)
        return 0

    monkeypatch.setattr(reaper, "remove_stale_uploads", slow_last_step)
    sweeper = threading.Thread(target=reaper.sweep)
    sweeper.start()
    assert inside.wait(10)
    threading.Timer(0.5, leave.set).start()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: exit at once, 0 if its guard can be taken
        os._exit(0 if reaper._SWEEPING.acquire(timeout=2) else 1)
    waited = time.monotonic() - started
    _, status = os.waitpid(pid, 0)
    sweeper.join(10)
    assert leave.is_set() and waited >= 0.4, f"forked {waited:.2f} s into a sweep"
    assert os.waitstatus_to_exitcode(status) == 0


def test_enqueue_failure_leaves_the_job_queued(fast, monkeypatch):
    from trinity_service import queue as sending

    def broken(*a, **kw):
        raise ConnectionError("broker down")

    monkeypatch.setattr(sending.producer(), "send_task", broken)
    job_id = queued_job()
    with session_scope() as s:
        assert sending.enqueue(session=s, job=load(job_id)) is False
    assert load(job_id).status == S.queued and load(job_id).enqueued_at is None
