"""Scale-out, shown: the API and two Celery worker processes on two GPU-class queues, PostgreSQL as
the database, Redis as the broker. CPU workers stand in for the GPU classes: ``<p>.small`` gets a
GPU size between the estimates of two tiny specs, so the API routes the small job there and the
big one to ``<p>.large`` by its estimate (nothing in the test names a queue for a job). Then the
large worker is killed -9 mid-run: the small one keeps serving its queue (and does not take the
large queue's job, which waits in the broker), and a replacement large worker resumes the job from
its checkpoint."""

from __future__ import annotations

import secrets
import signal
import time
from pathlib import Path

import pytest

from tests.reliability.conftest import REL_REDIS_URL, stack_env
from tests.service.live import JOB_TIMEOUT, Stack, tiny_job, wait_for
from tests.service.conftest import _postgres_database, alpaca_rows

SPECS = {"small": {"max_seq_length": 64, "batch_size": 2}, "big": {"max_seq_length": 512, "batch_size": 8}}


def job_body(stack: Stack, which: str, **train) -> dict:
    body = tiny_job(stack, stack.dataset_id, batch_size=SPECS[which]["batch_size"], **train)
    body["model"].update(max_seq_length=SPECS[which]["max_seq_length"], backend="peft")  # what a CPU worker runs
    return body


def needs(model_dir: Path) -> dict[str, tuple[float, float]]:
    """(recipe, cheapest rung) GPU GiB each spec needs, margin included: the estimate the API routes by."""
    from trinity_core import model_config
    from trinity_core.spec import parse_spec
    from trinity_core.train import ladder, memory

    config, out = model_config.load(str(model_dir), None), {}
    for which, shape in SPECS.items():
        spec = parse_spec({"model": {"name_or_path": str(model_dir), "max_seq_length": shape["max_seq_length"],
                                     "backend": "peft"}, "train": {"batch_size": shape["batch_size"]},
                           "data": {"dataset_id": "ds-x"}})
        gib = [p.estimate.gib for p in memory.plan(ladder.rungs(spec), spec, config, "peft", 1.0,
                                                      bf16_supported=False)]
        margin = lambda g: g + max(memory.ALLOCATOR_MARGIN[0], memory.ALLOCATOR_MARGIN[1] * g)  # noqa: E731
        out[which] = (margin(gib[0]), margin(min(gib)))
    return out


@pytest.fixture
def two_class_stack(tiny_model_dir, tmp_path, rel_redis):
    fits = needs(tiny_model_dir)
    assert fits["small"][0] < fits["big"][1], fits  # the small job's recipe fits where no rung of the big one does
    small_gib = (fits["small"][0] + fits["big"][1]) / 2
    prefix = f"scale.{secrets.token_hex(3)}"
    pg = _postgres_database()
    env = stack_env(tmp_path, prefix, tiny_model_dir, REL_REDIS_URL, TRINITY_DATABASE_URL=next(pg),
                    TRINITY_GPU_QUEUES=f"{prefix}.small,{prefix}.large",
                    TRINITY_QUEUE_GPU_GIB=f"{prefix}.small={small_gib:.4f},{prefix}.large={fits['big'][0] + 1:.4f}")
    stack = Stack(tmp_path, env, prefix)
    stack.model = str(tiny_model_dir)
    try:
        small, large = stack.start_worker("small", f"{prefix}.small"), stack.start_worker("large", f"{prefix}.large")
        stack.start_api()
        r = stack.http.post("/datasets", files={"file": ("train.jsonl", alpaca_rows(40))})
        assert r.status_code == 201, r.text
        stack.dataset_id = r.json()["id"]
        stack.wait_ready(small)
        stack.wait_ready(large)
        yield stack
    finally:
        stack.close()
        for name in (f"{prefix}.small", f"{prefix}.large"):
            rel_redis.delete(name)
        next(pg, None)


def ran_on(stack: Stack, job_id: str) -> str:
    """The worker the job row names (the Celery node name: ``<name>-<queue>@host``)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(stack.env["TRINITY_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            return conn.execute(sqlalchemy.text("SELECT worker FROM job WHERE id = :id"), {"id": job_id}).scalar_one()
    finally:
        engine.dispose()


def test_two_gpu_classes_route_by_estimate_and_survive_a_killed_worker(two_class_stack, rel_redis):
    stack, prefix = two_class_stack, two_class_stack.queue
    big = stack.submit(job_body(stack, "big", max_steps=12, save_steps=2))
    small = stack.submit(job_body(stack, "small", max_steps=3))
    assert big["queue"] == f"{prefix}.large" and big["routing"]["rule"] == "recipe_fits", big["routing"]
    assert small["queue"] == f"{prefix}.small" and small["routing"]["rule"] == "recipe_fits", small["routing"]
    assert {c["queue"]: c["start_rung"] for c in big["routing"]["compared"]}[f"{prefix}.small"] is None

    done = stack.wait_status(small["id"], "succeeded")
    assert done["resumes"] == 0 and ran_on(stack, small["id"]).startswith(f"small-{prefix}.small@")

    wait_for(lambda: any(c["step"] >= 2 for c in stack.http.get(f"/jobs/{big['id']}/checkpoints").json())
             and (stack.job(big["id"])["step"] or 0) >= 3, JOB_TIMEOUT, "the big job's checkpoint and step 3")
    assert ran_on(stack, big["id"]).startswith(f"large-{prefix}.large@")
    stack.workers["large"].kill(signal.SIGKILL)  # kill -9 the large worker and its training child
    assert stack.job(big["id"])["status"] == "running" and stack.job(big["id"])["step"] < 12, "killed mid-training"

    # The small worker keeps serving its queue while the large class is down...
    again = stack.submit(job_body(stack, "small", max_steps=3))
    assert again["queue"] == f"{prefix}.small"
    stack.wait_status(again["id"], "succeeded")
    assert ran_on(stack, again["id"]).startswith(f"small-{prefix}.small@")
    # ...and its reaper puts the dead worker's job back on the large queue, where it waits: the
    # small worker never takes it (it consumes only its own class's queue).
    requeued = stack.wait_status(big["id"], "queued", timeout=60)
    assert requeued["resumes"] == 1 and requeued["queue"] == f"{prefix}.large"
    wait_for(lambda: rel_redis.llen(f"{prefix}.large") >= 1, 30, "the job's message in the large queue")
    time.sleep(5)
    assert stack.job(big["id"])["status"] == "queued"

    replacement = stack.start_worker("large2", f"{prefix}.large")
    stack.wait_ready(replacement)
    done = stack.wait_status(big["id"], "succeeded")
    assert done["resumes"] == 1 and done["step"] == 12
    assert ran_on(stack, big["id"]).startswith(f"large2-{prefix}.large@")
    resumed = [e["data"]["resumed_from"] for e in stack.events(big["id"]) if "resumed_from" in e["data"]]
    assert resumed and resumed[0] >= 2  # from the checkpoint the killed worker wrote, not from step 1
