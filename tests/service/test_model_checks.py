"""Submit-time model checks: a job whose model cannot be found is refused before anything is queued,
at once and saying why; the recipe's default model is estimated offline from its shipped config."""

from __future__ import annotations

import time

import pytest

from .conftest import job_body, new_tenant


@pytest.fixture
def model_dir(tmp_path, monkeypatch, settings):
    """TRINITY_MODEL_DIRS = tmp_path."""
    from trinity_service.settings import get_settings

    monkeypatch.setenv("TRINITY_MODEL_DIRS", str(tmp_path))
    get_settings.cache_clear()
    return tmp_path


def assert_refused(response, code: str, param: str = "model.name_or_path") -> dict:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    return error


def assert_nothing_queued(client, headers, enqueued):
    assert enqueued == []
    assert client.get("/jobs", headers=headers).json()["data"] == []  # no job row either


@pytest.mark.parametrize("make", ["missing", "no_config"])
def test_local_model_that_is_not_there_is_refused_before_queueing(client, auth, dataset_id, enqueued, model_dir, make):
    path = model_dir / "gemma"
    if make == "no_config":
        path.mkdir()
        (path / "tokenizer.json").write_text("{}")
    body = job_body(dataset_id, model={"name_or_path": str(path), "max_seq_length": 128})
    error = assert_refused(client.post("/jobs", headers=auth[1], json=body), "model_unavailable")
    assert str(path) in error["message"] and error["details"][0]["loc"] == "model.name_or_path"
    assert ("config.json" in error["message"]) == (make == "no_config")
    assert_nothing_queued(client, auth[1], enqueued)
    r = client.post("/jobs/estimate", headers=auth[1], json={"model": {"name_or_path": str(path)}})
    assert_refused(r, "model_unavailable")


def test_model_problems_are_listed_with_the_others(client, auth, dataset_id, enqueued, model_dir):
    body = job_body(dataset_id, lora={"r": 0, "alpha": 16},
                    model={"name_or_path": str(model_dir / "missing"), "max_seq_length": 128})
    error = assert_refused(client.post("/jobs", headers=auth[1], json=body), "invalid_spec", "lora.r")
    assert {d["loc"] for d in error["details"]} == {"lora.r", "model.name_or_path"}
    assert_nothing_queued(client, auth[1], enqueued)


def test_unknown_hub_model_offline_is_refused_at_once(client, auth, dataset_id, enqueued):
    body = job_body(dataset_id, model={"name_or_path": "acme/no-such-model", "max_seq_length": 128})
    t0 = time.perf_counter()
    error = assert_refused(client.post("/jobs", headers=auth[1], json=body), "model_unavailable")
    assert time.perf_counter() - t0 < 2
    for hint in ("acme/no-such-model", "TRINITY_MODEL_DIRS", "huggingface-cli download", "HF_HUB_OFFLINE"):
        assert hint in error["message"]
    assert_nothing_queued(client, auth[1], enqueued)
    t0 = time.perf_counter()
    r = client.post("/jobs/estimate", headers=auth[1], json={"model": {"name_or_path": "acme/no-such-model"}})
    assert_refused(r, "model_unavailable")
    assert time.perf_counter() - t0 < 2


def test_the_default_model_needs_its_weights_for_a_job(client, auth, dataset_id, enqueued):
    """Its config ships (the estimate works), its weights do not: offline and not cached, refused."""
    body = job_body(dataset_id)
    del body["model"]
    error = assert_refused(client.post("/jobs", headers=auth[1], json=body), "model_unavailable")
    assert "unsloth/gemma-3-12b-it-bnb-4bit" in error["message"] and "weights" in error["message"]
    assert_nothing_queued(client, auth[1], enqueued)


def test_estimate_of_the_default_recipe_answers_offline_in_under_a_second(client, session):
    _, headers = new_tenant(session)
    t0 = time.perf_counter()
    r = client.post("/jobs/estimate", params={"gpu_gib": 15.1}, headers=headers, json={})
    assert time.perf_counter() - t0 < 1
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["start_rung"] == "recipe"  # Unsloth + fast DoRA: the full recipe fits a T4
    assert 10 < body["rungs"][0]["gib"] < 15.1 and body["rungs"][0]["assumptions"]["layers"] == 48
