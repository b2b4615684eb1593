"""The OpenAI-compatible surface (/v1) in-process, on SQLite and PostgreSQL: files, the mapping of a
fine-tuning request onto the Trinity spec, OpenAI's error shape, events, checkpoints and results
files. The official ``openai`` package drives a running service in test_openai_sdk.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trinity_service import crud
from trinity_service.states import JobStatus as S

from .conftest import alpaca_rows, new_tenant


def openai_error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def upload(client, headers, body=None, name="train.jsonl", purpose="fine-tune"):
    return client.post("/v1/files", headers=headers, data={"purpose": purpose},
                       files={"file": (name, alpaca_rows(12) if body is None else body)})


@pytest.fixture
def file_id(client, auth):
    r = upload(client, auth[1])
    assert r.status_code == 200, r.text
    return r.json()["id"]


def create(client, headers, file_id, **fields):
    body = {"model": "org/some-model", "training_file": file_id,
            "trinity_spec": {"model": {"max_seq_length": 128}, "lora": {"r": 8, "alpha": 16},
                             "train": {"max_steps": 3},
                             "export": {"merge": False, "gguf": False, "evaluate": False}}}
    body.update(fields)
    return client.post("/v1/fine_tuning/jobs", headers=headers, json=body)


def test_files_upload_list_retrieve_content_delete(client, auth, session):
    headers = auth[1]
    body = alpaca_rows(12)
    r = upload(client, headers, body)
    assert r.status_code == 200, r.text
    f = r.json()
    assert (f["object"], f["purpose"], f["status"], f["bytes"], f["filename"]) == \
        ("file", "fine-tune", "processed", len(body), "train.jsonl")
    assert isinstance(f["created_at"], int) and f["status_details"] is None
    second = upload(client, headers).json()
    page = client.get("/v1/files?limit=1", headers=headers).json()
    rest = client.get(f"/v1/files?limit=1&after={page['data'][0]['id']}", headers=headers).json()
    assert [x["id"] for x in page["data"] + rest["data"]] == [second["id"], f["id"]]
    assert page["has_more"] and not rest["has_more"] and page["last_id"] == second["id"]
    assert client.get("/v1/files?purpose=batch", headers=headers).json()["data"] == []
    assert client.get(f"/v1/files/{f['id']}", headers=headers).json() == f
    assert client.get(f"/v1/files/{f['id']}/content", headers=headers).content == body
    _, other = new_tenant(session)
    openai_error(client.get(f"/v1/files/{f['id']}", headers=other), 404, "file_id", "not_found")
    assert client.delete(f"/v1/files/{f['id']}", headers=headers).json() == \
        {"id": f["id"], "object": "file", "deleted": True}
    openai_error(client.get(f"/v1/files/{f['id']}", headers=headers), 404, "file_id")
    openai_error(client.delete(f"/v1/files/{f['id']}", headers=headers), 404, "file_id")


def test_bad_files_are_refused_or_marked(client, auth):
    openai_error(upload(client, auth[1], purpose="assistants"), 400, "purpose")
    openai_error(upload(client, auth[1], body=b"{nope\n{nope\n"), 400, "file", "invalid_dataset")
    half = upload(client, auth[1], body=alpaca_rows(4, bad=2)).json()
    assert half["status"] == "error" and "invalid" in half["status_details"]
    # a job refuses it, naming the request's own parameter
    error = openai_error(create(client, auth[1], half["id"]), 400, "training_file", "invalid_spec")
    assert "drop_invalid_rows" in error["message"]
    openai_error(client.get("/v1/files", headers={"Authorization": "Bearer trn_nope"}), 401, code="invalid_api_key")


def test_create_maps_the_openai_request_onto_the_spec(client, auth, file_id, enqueued):
    hp = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}
    spec_text = json.dumps({"lora": {"r": 8, "alpha": 16}, "train": {"max_steps": 3, "learning_rate": 1e-4},
                            "export": {"merge": False, "gguf": False, "evaluate": False}})
    r = client.post("/v1/fine_tuning/jobs", headers=auth[1], json={
        "model": "org/some-model", "training_file": file_id, "suffix": "support-bot", "seed": 7,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
        "metadata": {"team": "search", "trinity_spec": spec_text}})
    assert r.status_code == 200, r.text
    job = r.json()
    assert (job["object"], job["status"], job["model"], job["training_file"], job["seed"]) == \
        ("fine_tuning.job", "queued", "org/some-model", file_id, 7)
    assert job["hyperparameters"] == hp and job["method"]["supervised"]["hyperparameters"] == hp
    assert job["metadata"]["team"] == "search" and job["organization_id"] == auth[0]
    assert job["fine_tuned_model"] is None and job["result_files"] == [] and job["trained_tokens"] is None
    assert enqueued[-1] == job["id"]
    spec = client.get(f"/jobs/{job['id']}", headers=auth[1]).json()["spec"]
    # 12 rows, 1 held out for eval (data.split_indices): ceil(2 epochs × 11 rows / 4 per step) = 6 steps
    assert {k: spec["train"][k] for k in ("max_steps", "batch_size", "grad_accum", "seed")} == \
        {"max_steps": 6, "batch_size": 1, "grad_accum": 4, "seed": 7}
    assert spec["train"]["learning_rate"] == pytest.approx(5e-5)  # 0.5 × the spec's 1e-4
    assert spec["name"] == "support-bot" and spec["lora"]["r"] == 8 and spec["data"]["dataset_id"] == file_id
    assert spec["model"]["name_or_path"] == "org/some-model"
    # the deprecated top-level hyperparameters work too; auto keeps the spec's values
    job = create(client, auth[1], file_id, hyperparameters={"batch_size": "auto", "n_epochs": "auto"}).json()
    spec = client.get(f"/jobs/{job['id']}", headers=auth[1]).json()["spec"]
    assert (spec["train"]["max_steps"], spec["train"]["batch_size"], spec["train"]["grad_accum"]) == (3, 1, 4)
    assert job["hyperparameters"] == {"n_epochs": "auto", "batch_size": 4, "learning_rate_multiplier": 1.0}


@pytest.mark.parametrize("fields, param, code", [
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "invalid_request"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": "big"}}}},
     "method.supervised.hyperparameters.batch_size", "invalid_request"),
    ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier", None),
    ({"hyperparameters": {"n_epoch": 2}}, "hyperparameters.n_epoch", None),
    ({"training_file": "ds-missing"}, "training_file", "invalid_spec"),
    ({"model": "/etc"}, "model", "invalid_spec"),
    ({"method": {"type": "dpo"}}, "method.type", "unsupported_method"),
    ({"validation_file": "ds-x"}, "validation_file", "invalid_spec"),
    ({"metadata": {"trinity_spec": "{not json"}, "trinity_spec": None}, "metadata.trinity_spec", "invalid_request"),
    ({"temperature": 1}, "temperature", "invalid_request"),
])
def test_bad_requests_are_400_with_the_param(client, auth, file_id, fields, param, code):
    r = create(client, auth[1], file_id, **fields)
    error = openai_error(r, 400, param, code)
    if param == "hyperparameters.n_epochs":
        assert "must be 'auto' or an integer from 1 to 100" in error["message"]


def test_validation_file_is_the_eval_set(client, auth, file_id, session):
    from worker.runner import claim, job_spec

    eval_id = upload(client, auth[1], alpaca_rows(3), name="eval.jsonl").json()["id"]
    r = create(client, auth[1], file_id, validation_file=eval_id, hyperparameters={"n_epochs": 1})
    assert r.status_code == 200, r.text
    job = r.json()
    assert (job["training_file"], job["validation_file"]) == (file_id, eval_id)
    spec = client.get(f"/jobs/{job['id']}", headers=auth[1]).json()["spec"]
    assert spec["data"]["eval_dataset_id"] == eval_id
    assert (spec["data"]["eval_fraction"], spec["data"]["eval_min_rows"]) == (0.0, 0)
    assert spec["train"]["max_steps"] == 3  # all 12 training rows train: ceil(1 epoch × 12 rows / 4 per step)
    # the worker reads the uploaded eval file from the server's own store
    run = claim(job["id"], worker="w")
    data = job_spec(run).data
    assert data.eval_dataset_id is None and Path(data.eval_path).read_bytes() == alpaca_rows(3)

    # a held-out split asked for beside it, another tenant's file, an invalid file, a results file
    both = create(client, auth[1], file_id, validation_file=eval_id,
                  trinity_spec={"data": {"eval_fraction": 0.2}, "train": {"max_steps": 3}})
    assert "eval_fraction=0.2" in openai_error(both, 400, code="invalid_spec")["message"]
    _, other = new_tenant(session)
    theirs = upload(client, other, alpaca_rows(3)).json()["id"]
    openai_error(create(client, auth[1], file_id, validation_file=theirs), 400, "validation_file", "invalid_spec")
    bad = upload(client, auth[1], alpaca_rows(2, bad=1)).json()["id"]
    error = openai_error(create(client, auth[1], file_id, validation_file=bad), 400, "validation_file", "invalid_spec")
    assert "drop_invalid_rows" in error["message"]
    openai_error(create(client, auth[1], file_id, validation_file=f"file-results-{job['id']}"), 400,
                 "validation_file", "invalid_spec")


def test_trinity_spec_problems_all_at_once_with_did_you_mean(client, auth, file_id):
    r = create(client, auth[1], file_id, trinity_spec={"lora": {"rr": 8}, "train": {"max_steps": 0}}, queue="nope")
    error = openai_error(r, 400, code="invalid_spec")
    locs = {d["loc"] for d in error["details"]}
    assert {"lora.rr", "train.max_steps", "queue"} <= locs
    assert [d.get("did_you_mean") for d in error["details"] if d["loc"] == "lora.rr"] == ["lora.r"]


def test_list_retrieve_cancel_and_tenants(client, session, auth, file_id):
    ids = [create(client, auth[1], file_id).json()["id"] for _ in range(3)]
    page = client.get("/v1/fine_tuning/jobs?limit=2", headers=auth[1]).json()
    rest = client.get(f"/v1/fine_tuning/jobs?limit=2&after={page['data'][-1]['id']}", headers=auth[1]).json()
    assert [j["id"] for j in page["data"] + rest["data"]] == ids[::-1]
    assert page["has_more"] and not rest["has_more"] and page["object"] == "list"
    cancelled = client.post(f"/v1/fine_tuning/jobs/{ids[0]}/cancel", headers=auth[1]).json()
    assert cancelled["status"] == "cancelled" and isinstance(cancelled["finished_at"], int)
    openai_error(client.post(f"/v1/fine_tuning/jobs/{ids[0]}/cancel", headers=auth[1]), 409, "job_id", "job_finished")
    # a running job being cancelled still shows running (OpenAI has no cancelling) until its worker stops
    crud.claim_job(session=session, job_id=ids[1], worker="w")
    assert client.post(f"/v1/fine_tuning/jobs/{ids[1]}/cancel", headers=auth[1]).json()["status"] == "running"
    _, other = new_tenant(session)
    openai_error(client.get(f"/v1/fine_tuning/jobs/{ids[2]}", headers=other), 404, "job_id", "not_found")
    assert client.get("/v1/fine_tuning/jobs", headers=other).json()["data"] == []


def test_events_checkpoints_results_and_a_finished_job(client, auth, file_id, session, settings):
    job_id = create(client, auth[1], file_id).json()["id"]
    crud.claim_job(session=session, job_id=job_id, worker="w")
    for step in (1, 2, 3):
        crud.record_event(session=session, job_id=job_id, run_token=1, type="metrics", message=f"step {step}/3",
                          data={"step": step, "total_steps": 3, "loss": 2.0 / step, "lr": 1e-4},
                          progress={"step": step, "total_steps": 3, "eta_s": 30.0})
    running = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth[1]).json()
    assert running["status"] == "running" and running["estimated_finish"] >= running["created_at"] + 30
    crud.record_event(session=session, job_id=job_id, run_token=1, type="message", level="warning", message="careful")
    for step in (2, 3):
        (settings.jobs_dir / job_id / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (settings.jobs_dir / job_id / "checkpoints" / f"step-{step}" / "adapter.bin").write_bytes(b"x" * step)
    crud.transition(session=session, job_id=job_id, to=S.succeeded, run_token=1,
                    values={"result": {"tokens_per_s": 100.0, "train_seconds": 2.5}})

    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=3", headers=auth[1]).json()
    assert [e["message"] for e in events["data"]] == ["running -> succeeded", "careful", "step 3/3"]
    assert [e["level"] for e in events["data"]] == ["info", "warn", "info"] and events["has_more"]
    assert events["data"][2]["type"] == "metrics" and events["data"][2]["data"]["train_loss"] == pytest.approx(2 / 3)
    older = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?after={events['data'][-1]['id']}&limit=100",
                       headers=auth[1]).json()
    assert [e["message"] for e in older["data"]][:2] == ["step 2/3", "step 1/3"] and not older["has_more"]
    assert older["data"][-1]["data"]["status"] == "validating_files"  # the first event is last
    openai_error(client.get(f"/v1/fine_tuning/jobs/{job_id}/events?after=nope", headers=auth[1]), 400, "after")

    ckpts = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints?limit=1", headers=auth[1]).json()
    assert [c["step_number"] for c in ckpts["data"]] == [3] and ckpts["has_more"]
    c = ckpts["data"][0]
    assert c["metrics"]["train_loss"] == pytest.approx(2 / 3) and c["fine_tuning_job_id"] == job_id
    assert c["fine_tuned_model_checkpoint"].endswith(f":{job_id}:ckpt-step-3")
    rest = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints?after={c['id']}", headers=auth[1]).json()
    assert [c["step_number"] for c in rest["data"]] == [2] and not rest["has_more"]

    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth[1]).json()
    assert job["status"] == "succeeded" and job["trained_tokens"] == 250 and job["estimated_finish"] is None
    assert job["fine_tuned_model"] == f"ft:some-model:{auth[0]}::{job_id}"
    [results] = job["result_files"]
    meta = client.get(f"/v1/files/{results}", headers=auth[1]).json()
    assert (meta["purpose"], meta["filename"], meta["status"]) == ("fine-tune-results", "step_metrics.csv", "processed")
    csv = client.get(f"/v1/files/{results}/content", headers=auth[1]).text
    assert csv.splitlines()[0] == "step,train_loss,learning_rate,grad_norm,tokens_per_s"
    assert [line.split(",")[0] for line in csv.splitlines()[1:]] == ["1", "2", "3"]
    assert meta["bytes"] == len(csv.encode())
    _, other = new_tenant(session)
    openai_error(client.get(f"/v1/files/{results}", headers=other), 404)


def test_a_failed_job_carries_its_error(client, auth, file_id, session):
    job_id = create(client, auth[1], file_id).json()["id"]
    crud.claim_job(session=session, job_id=job_id, worker="w")
    error = {"code": "invalid_dataset", "message": "no rows", "param": "data.dataset_id"}
    crud.transition(session=session, job_id=job_id, to=S.failed, run_token=1, values={"error": error})
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth[1]).json()
    assert job["status"] == "failed" and job["error"] == {**error, "param": "training_file"}
