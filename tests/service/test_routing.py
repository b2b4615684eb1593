"""Routing by estimate (api/routing.py), in-process: queue GPU sizes are picked from the estimates
``POST /jobs/estimate`` gives two tiny specs, so each case is a real decision of the rule, not a
size written into the test. Enqueues are recorded; the two-worker run is tests/reliability/test_scaleout.py."""

from __future__ import annotations

import pytest

from trinity_core.train.memory import ALLOCATOR_MARGIN

from .conftest import job_body


def need(gib: float) -> float:
    """The smallest GPU the estimate ``gib`` fits, with the allocator margin (memory.Estimate.fits)."""
    return gib + max(ALLOCATOR_MARGIN[0], ALLOCATOR_MARGIN[1] * gib)


def body(model: str, dataset_id: str, seq: int, batch: int) -> dict:
    return job_body(dataset_id, model={"name_or_path": model, "max_seq_length": seq, "backend": "peft"},
                    train={"max_steps": 3, "batch_size": batch})


@pytest.fixture
def specs(client, auth, dataset_id, tiny_model_dir, monkeypatch):
    """A small and a big job on the tiny model, and each one's rung estimates (recipe first)."""
    from trinity_service.settings import get_settings

    monkeypatch.setenv("TRINITY_MODEL_DIRS", str(tiny_model_dir.parent))
    get_settings.cache_clear()
    out = {}
    for name, seq, batch in (("small", 64, 2), ("big", 512, 8)):
        spec = body(str(tiny_model_dir), dataset_id, seq, batch)
        r = client.post("/jobs/estimate", headers=auth[1], json=spec, params={"backend": "peft", "bf16": False})
        assert r.status_code == 200, r.text
        out[name] = (spec, [rung["gib"] for rung in r.json()["rungs"]], [rung["name"] for rung in r.json()["rungs"]])
    small, big = out["small"][1], out["big"][1]
    assert need(small[0]) < need(min(big)), (small, big)  # the two jobs differ: routing has a choice
    return out


def sizes(monkeypatch, **gib: float) -> None:
    """Queues gpu.default and gpu.t4 (tests/service/conftest.py) with these GPU sizes."""
    from trinity_service.settings import get_settings

    monkeypatch.setenv("TRINITY_QUEUE_GPU_GIB", ",".join(f"gpu.{k}={v:.4f}" for k, v in gib.items()))
    get_settings.cache_clear()


def post(client, auth, spec, queue=None):
    return client.post("/jobs", headers=auth[1], json=spec, params={"queue": queue} if queue else None)


def test_each_job_goes_to_the_smallest_queue_its_recipe_fits(client, auth, specs, monkeypatch, enqueued):
    (small_spec, small, _), (big_spec, big, _) = specs["small"], specs["big"]
    between = (need(small[0]) + need(min(big))) / 2  # fits the small job's recipe, none of the big job's rungs
    sizes(monkeypatch, t4=between, default=need(big[0]) + 1)
    a, b = post(client, auth, small_spec).json(), post(client, auth, big_spec).json()
    assert a["queue"] == "gpu.t4" and a["routing"]["rule"] == "recipe_fits"
    assert a["routing"]["estimate"]["recipe_gib"] == pytest.approx(small[0], abs=1e-3)
    assert "gpu.t4" in a["routing"]["reason"] and "smallest" in a["routing"]["reason"]
    assert b["queue"] == "gpu.default" and b["routing"]["rule"] == "recipe_fits"
    assert {c["queue"]: c["start_rung"] for c in b["routing"]["compared"]} == {"gpu.t4": None, "gpu.default": "recipe"}
    assert len(enqueued) == 2
    # GET /jobs/{id} shows the same decision
    assert client.get(f"/jobs/{b['id']}", headers=auth[1]).json()["routing"] == b["routing"]


def test_a_job_whose_recipe_fits_no_queue_goes_where_a_cheaper_rung_fits(client, auth, specs, monkeypatch):
    big_spec, big, names = specs["big"]
    cheaper = min(range(1, len(big)), key=lambda i: big[i])  # the rung the estimate calls smallest
    assert big[cheaper] < big[0], big
    sizes(monkeypatch, t4=(need(big[cheaper]) + need(big[0])) / 2, default=need(big[cheaper]) / 2)
    r = post(client, auth, big_spec)
    assert r.status_code == 201, r.text
    routing = r.json()["routing"]
    assert r.json()["queue"] == "gpu.t4" and routing["rule"] == "cheapest_rung_fits"
    start = routing["estimate"]["start_rung"]
    assert start != "recipe" and need(big[names.index(start)]) <= (need(big[cheaper]) + need(big[0])) / 2
    assert f"starts at {start}" in routing["reason"]


def test_a_job_no_queue_fits_is_refused_naming_estimate_and_largest_queue(client, auth, specs, monkeypatch, enqueued):
    big_spec, big, _ = specs["big"]
    sizes(monkeypatch, t4=0.01, default=need(min(big)) - 0.01)
    r = post(client, auth, big_spec)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "no_queue_fits" and error["param"] == "queue"
    assert f"{min(big):.2f} GiB" in error["message"] and "largest queue is gpu.default" in error["message"]
    assert enqueued == []


def test_an_explicit_queue_is_honoured_unless_not_even_the_cheapest_rung_fits(client, auth, specs, monkeypatch):
    (small_spec, small, _), (big_spec, big, _) = specs["small"], specs["big"]
    sizes(monkeypatch, t4=(need(small[0]) + need(min(big))) / 2, default=need(big[0]) + 1)
    r = post(client, auth, small_spec, queue="gpu.default")  # bigger than needed: honoured
    assert r.status_code == 201 and r.json()["queue"] == "gpu.default"
    assert r.json()["routing"]["rule"] == "explicit"
    r = post(client, auth, big_spec, queue="gpu.t4")
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "queue_too_small" and error["param"] == "queue"
    assert "gpu.t4" in error["message"] and "it fits gpu.default" in error["message"]


def test_without_sizes_or_for_an_unsized_queue_nothing_is_estimated(client, auth, specs, monkeypatch):
    big_spec = specs["big"][0]
    r = post(client, auth, big_spec)  # no TRINITY_QUEUE_GPU_GIB: the first queue, as before routing
    assert r.status_code == 201 and r.json()["queue"] == "gpu.default" and r.json()["routing"]["rule"] == "default"
    sizes(monkeypatch, default=100)
    r = post(client, auth, big_spec, queue="gpu.t4")
    assert r.status_code == 201 and r.json()["queue"] == "gpu.t4"
    assert r.json()["routing"]["rule"] == "explicit" and "no GPU size" in r.json()["routing"]["reason"]


@pytest.mark.parametrize("value, message", [
    ("gpu.t4", "is not QUEUE=GIB"), ("gpu.t4=15:fp8", "is not QUEUE=GIB"), ("gpu.t4=abc", "valid number"),
    ("gpu.t4=0", "greater than 0"), ("gpu.h100=80", "gpu.h100, not in TRINITY_GPU_QUEUES"),
])
def test_bad_queue_sizes_are_refused_at_startup(monkeypatch, value, message):
    from pydantic import ValidationError

    from trinity_service.settings import Settings

    monkeypatch.setenv("TRINITY_QUEUE_GPU_GIB", value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_sizes_parse_from_the_environment(monkeypatch):
    from trinity_service.settings import Settings

    monkeypatch.setenv("TRINITY_QUEUE_GPU_GIB", "gpu.t4=15.1, gpu.default=79:bf16")
    got = {name: (c.gib, c.bf16) for name, c in Settings().queue_gpu_gib.items()}
    assert got == {"gpu.t4": (15.1, False), "gpu.default": (79.0, True)}


def test_openai_jobs_are_routed_the_same_way(client, auth, specs, dataset_id, monkeypatch):
    (small_spec, small, _), (big_spec, big, _) = specs["small"], specs["big"]
    sizes(monkeypatch, t4=(need(small[0]) + need(min(big))) / 2, default=need(big[0]) + 1)

    def create(spec):
        trinity_spec = {k: v for k, v in spec.items() if k != "data"}
        return client.post("/v1/fine_tuning/jobs", headers=auth[1], json={
            "model": spec["model"]["name_or_path"], "training_file": dataset_id, "trinity_spec": trinity_spec})

    for spec, queue in ((small_spec, "gpu.t4"), (big_spec, "gpu.default")):
        r = create(spec)
        assert r.status_code == 200, r.text
        job = client.get(f"/jobs/{r.json()['id']}", headers=auth[1]).json()
        assert job["queue"] == queue and job["routing"]["rule"] == "recipe_fits"
    sizes(monkeypatch, t4=0.01, default=0.02)
    r = create(big_spec)
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_queue_fits", r.text  # /v1: OpenAI's 400
