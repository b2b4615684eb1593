"""The HTTP API in-process (TestClient), on SQLite and PostgreSQL. Enqueues are recorded, not
sent: training runs in test_lifecycle.py."""

from __future__ import annotations

import hashlib
import io
import json
import time

import pytest

from trinity_service import crud
from trinity_service.states import JobStatus as S
from trinity_core.artifacts import write_manifest

from .conftest import alpaca_rows, job_body, new_tenant


def assert_error(r, status, code, param=None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


# ── auth and error shape ─────────────────────────────────────────────────────────────────────

def test_health_needs_no_key(client):
    assert client.get("/health").json() == {"status": "ok"}


@pytest.mark.parametrize("path", ["/jobs", "/datasets", "/jobs/ftjob-x/events", "/jobs/ftjob-x/artifacts"])
def test_every_route_needs_a_key(client, path):
    r = client.get(path)
    assert_error(r, 401, "missing_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(client.get(path, headers={"Authorization": "Bearer trn_wrong"}), 401, "invalid_api_key")
    assert_error(client.get(path, headers={"Authorization": "Basic abc"}), 401, "missing_api_key")


def test_another_tenants_things_are_404(client, session, auth, dataset_id):
    job = client.post("/jobs", headers=auth[1], json=job_body(dataset_id)).json()
    _, other = new_tenant(session)
    for path in (f"/jobs/{job['id']}", f"/jobs/{job['id']}/events", f"/jobs/{job['id']}/events/stream",
                 f"/jobs/{job['id']}/artifacts", f"/jobs/{job['id']}/artifacts/result.json",
                 f"/jobs/{job['id']}/checkpoints", f"/datasets/{dataset_id}"):
        assert_error(client.get(path, headers=other), 404, "not_found")
    assert_error(client.post(f"/jobs/{job['id']}/cancel", headers=other), 404, "not_found")
    # and their dataset cannot be used either
    r = client.post("/jobs", headers=other, json=job_body(dataset_id))
    assert_error(r, 422, "invalid_spec", "data.dataset_id")
    assert client.get("/jobs", headers=other).json()["data"] == []


def test_framework_errors_have_the_same_shape(client, auth):
    assert_error(client.get("/no-such-route", headers=auth[1]), 404, "not_found")
    assert_error(client.delete("/jobs", headers=auth[1]), 405, "method_not_allowed")
    error = assert_error(client.get("/jobs?limit=0", headers=auth[1]), 422, "invalid_request", "limit")
    assert error["details"][0]["loc"] == "limit"
    not_an_object = client.post("/jobs", headers={**auth[1], "content-type": "application/json"}, content=b"[1,2]")
    assert_error(not_an_object, 422, "invalid_request")
    assert_error(client.post("/jobs", headers={**auth[1], "content-type": "application/json"}, content=b"{oops"),
                 422, "invalid_request")


# ── datasets ─────────────────────────────────────────────────────────────────────────────────

def test_upload_valid_dataset(client, auth, settings):
    body = alpaca_rows(12)
    r = client.post("/datasets", headers=auth[1], files={"file": ("train.jsonl", body)})
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["status"] == "valid" and ds["format"] == "alpaca" and ds["rows"] == 12 and ds["errors"] == []
    assert ds["sha256"] == hashlib.sha256(body).hexdigest() and ds["size_bytes"] == len(body)
    assert ds["stats"]["length"]["unit"] == "chars" and ds["stats"]["valid_rows"] == 12
    stored = list((settings.datasets_dir / ds["id"]).iterdir())
    assert [p.name for p in stored] == ["data.jsonl"] and stored[0].read_bytes() == body
    assert not list((settings.datasets_dir / ".tmp").iterdir())  # temp file renamed, none left
    assert client.get(f"/datasets/{ds['id']}", headers=auth[1]).json() == ds
    assert ds["id"] in [d["id"] for d in client.get("/datasets", headers=auth[1]).json()["data"]]


@pytest.mark.parametrize("name,make", [
    ("train.csv", lambda: b"instruction,output\n" + b"".join(f"q{i},a{i}\n".encode() for i in range(5))),
    ("train.json", lambda: json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]).encode()),
    ("train.parquet", lambda: _parquet([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)])),
])
def test_upload_other_formats(client, auth, name, make):
    r = client.post("/datasets", headers=auth[1], files={"file": (name, make())})
    assert r.status_code == 201, r.text
    assert r.json()["rows"] == 5 and r.json()["status"] == "valid"


def _parquet(rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def test_upload_with_bad_rows_is_stored_and_reports_every_row(client, auth, dataset_id):
    body = alpaca_rows(6) + b'{"instruction": "no output"}\n' + b"{oops\n"
    r = client.post("/datasets", headers=auth[1], files={"file": ("train.jsonl", body)})
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["status"] == "invalid"
    assert sorted(e["row"] for e in ds["errors"]) == [7, 8]
    # a job refuses it, unless it drops invalid rows
    r = client.post("/jobs", headers=auth[1], json=job_body(ds["id"]))
    error = assert_error(r, 422, "invalid_spec", "data.dataset_id")
    assert "drop_invalid_rows" in error["message"]
    body = job_body(ds["id"])
    body["data"]["drop_invalid_rows"] = True
    assert client.post("/jobs", headers=auth[1], json=body).status_code == 201


@pytest.mark.parametrize("files,status,code", [
    ({"file": ("train.txt", b"hello")}, 422, "unsupported_file_type"),
    ({"file": ("train.jsonl", b"{bad\n{worse\n")}, 422, "invalid_dataset"),
    ({"file": ("train.parquet", b"not parquet")}, 422, "invalid_dataset"),
    ({"file": ("train.jsonl", b"")}, 422, "invalid_dataset"),
    ({"other": ("train.jsonl", b"{}")}, 422, "invalid_upload"),
])
def test_bad_uploads_name_the_problem(client, auth, settings, files, status, code):
    r = client.post("/datasets", headers=auth[1], files=files)
    error = assert_error(r, status, code)
    assert str(settings.data_dir) not in error["message"]  # no server paths leak
    assert not list((settings.datasets_dir / ".tmp").glob("*"))


def test_upload_options_are_checked(client, auth):
    r = client.post("/datasets", headers=auth[1], files={"file": ("t.jsonl", alpaca_rows(3))},
                    data={"format": "klingon", "columns": "[1]", "max_seq_length": "-3", "tokenizer": "/etc"})
    error = assert_error(r, 422, "invalid_request", "format")
    assert [d["loc"] for d in error["details"]] == ["format", "columns", "max_seq_length", "tokenizer"]


def test_upload_with_column_mapping(client, auth):
    rows = b"".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}).encode() + b"\n" for i in range(4))
    r = client.post("/datasets", headers=auth[1], files={"file": ("t.jsonl", rows)},
                    data={"format": "alpaca", "columns": json.dumps({"q": "instruction", "a": "output"})})
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "valid" and r.json()["mapping"] == {"q": "instruction", "a": "output"}


def test_upload_over_the_limit_is_413_and_leaves_nothing(client, auth, settings):
    big = b"x" * (settings.max_upload_bytes + 200_000)  # within the drain window: a clean 413 while streaming
    r = client.post("/datasets", headers=auth[1], files={"file": ("big.jsonl", big)})
    assert_error(r, 413, "file_too_large", "file")
    huge = b"x" * (settings.max_upload_bytes + 17 * 2**20)  # refused from Content-Length, before reading
    assert_error(client.post("/datasets", headers=auth[1], files={"file": ("big.jsonl", huge)}), 413, "file_too_large")
    assert not list((settings.datasets_dir / ".tmp").glob("*"))


def test_upload_needs_multipart(client, auth):
    assert_error(client.post("/datasets", headers=auth[1], json={"a": 1}), 415, "unsupported_media_type")


# ── jobs ─────────────────────────────────────────────────────────────────────────────────────

def test_create_job_commits_then_enqueues(client, auth, dataset_id, enqueued, session):
    r = client.post("/jobs", headers=auth[1], json=job_body(dataset_id))
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "queued" and job["queue"] == "gpu.default" and job["dataset_id"] == dataset_id
    assert job["queue_position"] >= 1 and job["created_at"] <= job["queued_at"]
    # the stored spec is the validated one, every default fixed at submit time (no unset optionals)
    assert job["spec"]["data"] == {"dataset_id": dataset_id, "split": "train", "format": "auto", "columns": {},
                                   "eval_fraction": 0.05, "eval_min_rows": 1, "drop_invalid_rows": False,
                                   "turn_end_check": "error"}
    assert job["spec"]["train"]["learning_rate"] == 2e-4 and job["spec"]["lora"]["use_dora"] is True
    assert enqueued[-1] == job["id"]
    events = client.get(f"/jobs/{job['id']}/events", headers=auth[1]).json()["data"]
    assert [e["data"]["status"] for e in events] == ["validating_files", "queued"]
    assert client.get(f"/jobs/{job['id']}", headers=auth[1]).json()["id"] == job["id"]


def test_bad_spec_lists_every_problem(client, auth, dataset_id):
    body = job_body(dataset_id, lora={"r": 0, "alpha": 16, "bogus": 1, "rr": 8}, train={"max_steps": -1})
    body["data"] = {"dataset_id": "ds-missing"}
    body["model"] = {"name_or_path": "/etc", "max_seq_length": 8}
    error = assert_error(client.post("/jobs?queue=gpu.nope", headers=auth[1], json=body), 422, "invalid_spec")
    locs = {d["loc"] for d in error["details"]}
    assert {"lora.r", "lora.bogus", "lora.rr", "train.max_steps", "model.max_seq_length", "model.name_or_path",
            "data.dataset_id", "queue"} <= locs
    for loc in locs:
        assert loc in error["message"]
    assert [d.get("did_you_mean") for d in error["details"] if d["loc"] == "lora.rr"] == ["lora.r"]
    assert "lora.rr: unknown field; did you mean lora.r?" in error["message"]


def test_delete_a_dataset_no_job_uses(client, session, auth, dataset_id, settings):
    r = client.post("/datasets", headers=auth[1], files={"file": ("t.jsonl", alpaca_rows(3))})
    unused = r.json()["id"]
    assert (settings.datasets_dir / unused).is_dir()
    _, other = new_tenant(session)
    assert_error(client.delete(f"/datasets/{unused}", headers=other), 404, "not_found")
    assert client.delete(f"/datasets/{unused}", headers=auth[1]).status_code == 204
    assert not (settings.datasets_dir / unused).exists()
    assert_error(client.get(f"/datasets/{unused}", headers=auth[1]), 404, "not_found")
    crud.create_job(session=session, tenant=auth[0], spec=job_body(dataset_id), queue="gpu.default",
                    dataset_id=dataset_id)
    assert_error(client.delete(f"/datasets/{dataset_id}", headers=auth[1]), 409, "dataset_in_use")
    assert client.get(f"/datasets/{dataset_id}", headers=auth[1]).status_code == 200
    # a dataset a job uses as its eval file (data.eval_dataset_id, OpenAI's validation_file) is in use too
    eval_only = client.post("/datasets", headers=auth[1], files={"file": ("e.jsonl", alpaca_rows(3))}).json()["id"]
    body = job_body(dataset_id)
    body["data"] = {**body["data"], "eval_dataset_id": eval_only}
    crud.create_job(session=session, tenant=auth[0], spec=body, queue="gpu.default", dataset_id=dataset_id)
    assert_error(client.delete(f"/datasets/{eval_only}", headers=auth[1]), 409, "dataset_in_use")


def test_spec_may_not_read_server_files(client, auth):
    error = assert_error(client.post("/jobs", headers=auth[1], json={"data": {"path": "/etc/passwd"}}),
                         422, "invalid_spec", "data.path")
    assert "POST /datasets" in error["message"]
    assert_error(client.post("/jobs", headers=auth[1], json={}), 422, "invalid_spec", "data.dataset_id")


def test_queue_choice(client, auth, dataset_id, enqueued):
    job = client.post("/jobs?queue=gpu.t4", headers=auth[1], json=job_body(dataset_id)).json()
    assert job["queue"] == "gpu.t4"


def test_idempotency_key(client, auth, dataset_id, enqueued):
    headers = {**auth[1], "Idempotency-Key": f"key-{time.time_ns()}"}
    first = client.post("/jobs", headers=headers, json=job_body(dataset_id))
    again = client.post("/jobs", headers=headers, json=job_body(dataset_id))
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"] and enqueued.count(first.json()["id"]) == 1
    other = job_body(dataset_id, train={"max_steps": 4})
    assert_error(client.post("/jobs", headers=headers, json=other), 409, "idempotency_key_reused", "Idempotency-Key")
    assert_error(client.post("/jobs?queue=gpu.t4", headers=headers, json=job_body(dataset_id)),
                 409, "idempotency_key_reused")


def test_list_jobs_paginates_and_filters(client, session, dataset_id, auth):
    tenant, headers = auth
    ids = [client.post("/jobs", headers=headers, json=job_body(dataset_id)).json()["id"] for _ in range(3)]
    client.post(f"/jobs/{ids[1]}/cancel", headers=headers)
    page = client.get("/jobs?limit=2", headers=headers).json()
    rest = client.get(f"/jobs?limit=2&after={page['data'][-1]['id']}", headers=headers).json()
    assert [j["id"] for j in page["data"] + rest["data"]] == ids[::-1]
    assert page["has_more"] and not rest["has_more"]
    cancelled = client.get("/jobs?status=cancelled", headers=headers).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[1]]
    assert_error(client.get("/jobs?status=paused", headers=headers), 422, "invalid_request", "status")


def test_cancel_queued_job_never_starts(client, auth, dataset_id):
    job = client.post("/jobs", headers=auth[1], json=job_body(dataset_id)).json()
    r = client.post(f"/jobs/{job['id']}/cancel", headers=auth[1])
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    assert_error(client.post(f"/jobs/{job['id']}/cancel", headers=auth[1]), 409, "job_finished")
    from worker.runner import claim

    assert claim(job["id"], worker="w") is None


def test_cancel_running_job_flags_it(client, auth, dataset_id, session):
    job = client.post("/jobs", headers=auth[1], json=job_body(dataset_id)).json()
    crud.claim_job(session=session, job_id=job["id"], worker="w")
    r = client.post(f"/jobs/{job['id']}/cancel", headers=auth[1]).json()
    assert r["status"] == "cancelling" and r["cancel_requested"]


def test_job_shows_progress_settings_and_errors(client, auth, dataset_id, session):
    job = client.post("/jobs", headers=auth[1], json=job_body(dataset_id)).json()
    crud.claim_job(session=session, job_id=job["id"], worker="w")
    crud.record_event(session=session, job_id=job["id"], run_token=1, type="metrics", message="step 2/3",
                      data={"step": 2}, progress={"step": 2, "total_steps": 3, "loss": 1.5, "tokens_per_s": 99.0,
                                                  "eta_s": 4.0, "rung": "dora_off",
                                                  "settings": {"r": 8, "use_dora": False}})
    got = client.get(f"/jobs/{job['id']}", headers=auth[1]).json()
    assert (got["status"], got["step"], got["total_steps"], got["loss"], got["tokens_per_s"], got["eta_s"]) == \
        ("running", 2, 3, 1.5, 99.0, 4.0)
    assert got["rung"] == "dora_off" and got["settings"]["use_dora"] is False and got["queue_position"] is None
    error = {"code": "training_failed", "message": "loss is NaN", "param": None}
    crud.transition(session=session, job_id=job["id"], to=S.failed, run_token=1, values={"error": error})
    got = client.get(f"/jobs/{job['id']}", headers=auth[1]).json()
    assert got["status"] == "failed" and got["error"]["code"] == "training_failed" and got["finished_at"]


# ── events ───────────────────────────────────────────────────────────────────────────────────

@pytest.fixture
def finished_job(client, auth, dataset_id, session):
    """A job with 21 recorded events (4 status, 8 metrics, 9 messages) that ended succeeded."""
    job = client.post("/jobs", headers=auth[1], json=job_body(dataset_id)).json()
    crud.claim_job(session=session, job_id=job["id"], worker="w")
    for step in range(1, 9):
        crud.record_event(session=session, job_id=job["id"], run_token=1, type="metrics",
                          message=f"step {step}", data={"step": step, "loss": 1.0 / step})
    crud.record_event(session=session, job_id=job["id"], run_token=1, type="message", level="warning",
                      message="out of memory: stepping down", data={"rung": "r_32"})
    for i in range(8):
        crud.record_event(session=session, job_id=job["id"], run_token=1, type="message", message=f"note {i}")
    crud.transition(session=session, job_id=job["id"], to=S.succeeded, run_token=1)
    return job["id"]


def test_events_page_by_seq_and_filter(client, auth, finished_job):
    url = f"/jobs/{finished_job}/events"
    seen, after = [], 0
    while True:
        page = client.get(f"{url}?after={after}&limit=7", headers=auth[1]).json()
        seen += [e["seq"] for e in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_seq"]
    assert seen == list(range(1, 22))
    metrics = client.get(f"{url}?type=metrics", headers=auth[1]).json()["data"]
    assert [e["data"]["step"] for e in metrics] == list(range(1, 9))
    warnings = client.get(f"{url}?level=warning", headers=auth[1]).json()["data"]
    assert [e["data"] for e in warnings] == [{"rung": "r_32"}]
    both = client.get(f"{url}?type=status&type=metrics", headers=auth[1]).json()["data"]
    assert {e["type"] for e in both} == {"status", "metrics"} and len(both) == 8 + 4


def parse_sse(text: str) -> list[dict]:
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "data" in fields:
            out.append(fields)
    return out


def test_sse_replays_after_last_event_id_and_ends(client, auth, finished_job):
    url = f"/jobs/{finished_job}/events/stream"
    r = client.get(url, headers=auth[1])
    assert r.headers["content-type"].startswith("text/event-stream")
    blocks = parse_sse(r.text)
    assert [int(b["id"]) for b in blocks[:-1]] == list(range(1, 22))
    assert blocks[-1]["event"] == "end" and json.loads(blocks[-1]["data"]) == {"status": "succeeded"}
    assert json.loads(blocks[0]["data"])["seq"] == 1
    resumed = parse_sse(client.get(url, headers={**auth[1], "Last-Event-ID": "15"}).text)
    assert [int(b["id"]) for b in resumed[:-1]] == [16, 17, 18, 19, 20, 21]
    by_query = parse_sse(client.get(f"{url}?last_event_id=18", headers=auth[1]).text)
    assert [int(b["id"]) for b in by_query[:-1]] == [19, 20, 21]
    only_metrics = parse_sse(client.get(f"{url}?type=metrics", headers=auth[1]).text)
    assert len(only_metrics) == 9
    assert_error(client.get(url, headers={**auth[1], "Last-Event-ID": "abc"}), 422, "invalid_request")


# ── artifacts ────────────────────────────────────────────────────────────────────────────────

@pytest.fixture
def job_with_files(client, auth, dataset_id, settings):
    job = client.post("/jobs", headers=auth[1], json=job_body(dataset_id)).json()
    workdir = settings.jobs_dir / job["id"]
    (workdir / "adapter").mkdir(parents=True)
    payload = bytes(range(256)) * 400
    (workdir / "adapter" / "adapter_model.safetensors").write_bytes(payload)
    (workdir / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (workdir / "result.json").write_text("{}")
    (workdir / "checkpoints" / "step-5").mkdir(parents=True)
    (workdir / "checkpoints" / "step-5" / "state.bin").write_bytes(b"12345")
    (workdir / "checkpoints" / "step-10").mkdir()
    (workdir / "checkpoints" / ".staging" / "checkpoint-15").mkdir(parents=True)  # incomplete: not listed
    write_manifest(workdir, _entries(workdir))
    (settings.jobs_dir / "secret.txt").write_text("another job's file")
    return job["id"], payload


def _entries(workdir):
    from trinity_core.artifacts import entry

    return [entry(workdir, workdir / "adapter" / "adapter_model.safetensors", name="adapter_model.safetensors",
                  kind="adapter"),
            entry(workdir, workdir / "adapter" / "adapter_config.json", name="adapter_config.json", kind="adapter"),
            entry(workdir, workdir / "result.json", name="result.json", kind="result")]


def test_artifacts_list_and_download(client, auth, job_with_files):
    job_id, payload = job_with_files
    listed = client.get(f"/jobs/{job_id}/artifacts", headers=auth[1]).json()
    assert [a["name"] for a in listed] == ["adapter_model.safetensors", "adapter_config.json", "result.json"]
    assert "path" not in listed[0]
    sha = hashlib.sha256(payload).hexdigest()
    assert listed[0] == {"name": "adapter_model.safetensors", "kind": "adapter", "size": len(payload), "sha256": sha}
    r = client.get(f"/jobs/{job_id}/artifacts/adapter_model.safetensors", headers=auth[1])
    assert r.status_code == 200 and r.content == payload
    assert r.headers["content-length"] == str(len(payload)) and r.headers["etag"] == f'"{sha}"'
    assert r.headers["accept-ranges"] == "bytes"


def test_artifact_range_requests_resume_a_download(client, auth, job_with_files):
    job_id, payload = job_with_files
    url = f"/jobs/{job_id}/artifacts/adapter_model.safetensors"
    first = client.get(url, headers={**auth[1], "Range": "bytes=0-999"})
    assert first.status_code == 206 and first.content == payload[:1000]
    assert first.headers["content-range"] == f"bytes 0-999/{len(payload)}"
    rest = client.get(url, headers={**auth[1], "Range": "bytes=1000-", "If-Range": first.headers["etag"]})
    assert rest.status_code == 206 and first.content + rest.content == payload
    assert client.get(url, headers={**auth[1], "Range": "bytes=-10"}).content == payload[-10:]
    stale = client.get(url, headers={**auth[1], "Range": "bytes=1000-", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == payload  # changed file: the whole thing
    r = client.get(url, headers={**auth[1], "Range": f"bytes={len(payload)}-"})
    assert_error(r, 416, "range_not_satisfiable", "Range")
    assert r.headers["content-range"] == f"bytes */{len(payload)}"


@pytest.mark.parametrize("name", ["adapter/adapter_model.safetensors", "..%2Fsecret.txt", "..%2F..%2Fetc%2Fpasswd",
                                  "%2Fetc%2Fpasswd", "artifacts.json", "checkpoints/step-5/state.bin", "nope"])
def test_only_manifest_names_download(client, auth, job_with_files, name):
    assert_error(client.get(f"/jobs/{job_with_files[0]}/artifacts/{name}", headers=auth[1]), 404, "not_found")


def test_manifest_paths_cannot_escape_the_workdir(client, auth, job_with_files, settings):
    job_id, _ = job_with_files
    workdir = settings.jobs_dir / job_id
    rows = json.loads((workdir / "artifacts.json").read_text())
    rows.append({"name": "evil", "kind": "result", "path": "../secret.txt", "size": 1, "sha256": None})
    (workdir / "artifacts.json").write_text(json.dumps(rows))
    assert_error(client.get(f"/jobs/{job_id}/artifacts/evil", headers=auth[1]), 404, "not_found")


def test_checkpoints(client, auth, job_with_files, settings):
    got = client.get(f"/jobs/{job_with_files[0]}/checkpoints", headers=auth[1]).json()
    assert [(c["step"], c["size_bytes"]) for c in got] == [(5, 5), (10, 0)]
    assert [(c["eval_loss"], c["best"]) for c in got] == [(None, False), (None, False)]  # not evaluated
    # evaluated during training: each checkpoint has its eval loss; the newest one's state names the best
    root = settings.jobs_dir / job_with_files[0] / "checkpoints"
    (root / "step-5" / "trinity_eval.json").write_text(json.dumps({"step": 5, "eval_loss": 1.25, "state": {"best_step": 5}}))
    (root / "step-10" / "trinity_eval.json").write_text(json.dumps({"step": 10, "eval_loss": 1.5, "state": {"best_step": 5}}))
    got = client.get(f"/jobs/{job_with_files[0]}/checkpoints", headers=auth[1]).json()
    assert [(c["step"], c["eval_loss"], c["best"]) for c in got] == [(5, 1.25, True), (10, 1.5, False)]


def test_no_artifacts_yet(client, auth, dataset_id):
    job = client.post("/jobs", headers=auth[1], json=job_body(dataset_id)).json()
    assert client.get(f"/jobs/{job['id']}/artifacts", headers=auth[1]).json() == []
    assert client.get(f"/jobs/{job['id']}/checkpoints", headers=auth[1]).json() == []
