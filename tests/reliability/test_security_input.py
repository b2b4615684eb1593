"""Security and bad input against a real uvicorn (tests/reliability/conftest.py): auth on every
route, tenant isolation, key handling, malformed datasets, oversize uploads, path traversal,
out-of-range specs, and schemathesis fuzzing from the app's own OpenAPI schema. No training:
jobs go to a queue nobody consumes."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import alpaca_rows
from tests.service.live import ROOT, tiny_job

from .conftest import MAX_UPLOAD_MB


def app_routes() -> list[tuple[str, str]]:
    """(method, path) of every route of the app, from ``app.routes`` (included routers expanded)."""
    from api.main import create_app

    found = set()
    for route in create_app().routes:
        contexts = route.effective_route_contexts() if hasattr(route, "effective_route_contexts") else [route]
        for ctx in contexts:
            path = getattr(ctx, "path_format", None) or getattr(ctx, "path", None)
            for method in getattr(ctx, "methods", None) or ():
                if method != "HEAD" and path:
                    found.add((method, path))
    return sorted(found)


PUBLIC = {"/health", "/livez", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
# The dashboard (api/routes/dashboard.py): static pages without data; their script calls the JSON API
# with the key. They are public by design; test_dashboard_pages_carry_no_data checks they leak nothing.
DASHBOARD_PAGES = {"/", "/ui", "/ui/jobs/{job_id}"}


@pytest.fixture(scope="module")
def owned(rstack):
    """A dataset and a job of tenant acme (parked queue), with a manifest and an artifact file."""
    from trinity_core.artifacts import entry, write_manifest

    r = rstack.http.post("/datasets", files={"file": ("train.jsonl", alpaca_rows(20))})
    assert r.status_code == 201, r.text
    dataset_id = r.json()["id"]
    job = rstack.submit(tiny_job(rstack, dataset_id), queue=f"{rstack.queue}.parked")
    workdir = Path(rstack.env["TRINITY_DATA_DIR"]) / "jobs" / job["id"]
    (workdir / "adapter").mkdir(parents=True)
    (workdir / "adapter" / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    (workdir / "checkpoints" / "step-2").mkdir(parents=True)
    write_manifest(workdir, [entry(workdir, workdir / "adapter" / "adapter_model.safetensors",
                                   name="adapter_model.safetensors", kind="adapter")])
    (Path(rstack.env["TRINITY_DATA_DIR"]) / "secret.txt").write_text("not for download")
    return {"dataset_id": dataset_id, "job_id": job["id"], "artifact": "adapter_model.safetensors"}


def fill(path: str, owned: dict) -> str:
    values = {"job_id": owned["job_id"], "dataset_id": owned["dataset_id"], "name": owned["artifact"]}
    return re.sub(r"\{(\w+)(:\w+)?\}", lambda m: values.get(m.group(1), "x"), path)


# ── Security ─────────────────────────────────────────────────────────────────────────────────

def test_every_route_needs_a_key(rstack, owned):
    routes = [(m, p) for m, p in app_routes() if p not in PUBLIC | DASHBOARD_PAGES]
    assert len(routes) >= 11, routes
    bad_headers = [{}, {"Authorization": "Bearer trn_not-a-real-key"}, {"Authorization": "Bearer"},
                   {"Authorization": f"Basic {rstack.key}"}, {"Authorization": rstack.key}]
    for method, path in routes:
        url = rstack.base + fill(path, owned)
        for headers in bad_headers:
            r = httpx.request(method, url, headers=headers, timeout=30)
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
            assert r.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")
            assert r.headers.get("www-authenticate") == "Bearer"
    assert httpx.get(rstack.base + "/health").status_code == 200
    assert httpx.get(rstack.base + "/livez").status_code == 200


def test_dashboard_pages_carry_no_data(rstack, owned):
    """The pages answer the same bytes for a real job, a missing one, with or without a key."""
    page = lambda jid, h=None: httpx.get(f"{rstack.base}/ui/jobs/{jid}", headers=h or {})  # noqa: E731
    real, missing = page(owned["job_id"]), page("ftjob-doesnotexist")
    keyed = page(owned["job_id"], {"Authorization": f"Bearer {rstack.other_key}"})
    assert real.status_code == missing.status_code == keyed.status_code == 200
    assert real.content == missing.content == keyed.content and owned["job_id"].encode() not in real.content
    index = httpx.get(f"{rstack.base}/ui")
    assert index.status_code == 200 and b"ftjob-" not in index.content and b"ds-" not in index.content
    assert "frame-ancestors 'none'" in index.headers.get("content-security-policy", "")


def test_another_tenant_sees_404_everywhere(rstack, owned):
    intruder = {"Authorization": f"Bearer {rstack.other_key}"}
    checked = []
    for method, path in app_routes():
        if path in DASHBOARD_PAGES or not ("{job_id}" in path or "{dataset_id}" in path):
            continue
        r = httpx.request(method, rstack.base + fill(path, owned), headers=intruder, timeout=30)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
        assert r.json()["error"]["code"] == "not_found"
        checked.append(path)
    for required in ("/jobs/{job_id}", "/datasets/{dataset_id}", "/jobs/{job_id}/events",
                     "/jobs/{job_id}/events/stream", "/jobs/{job_id}/artifacts", "/jobs/{job_id}/artifacts/{name}"):
        assert required in checked, checked
    # the owner gets the same URLs (so the 404s above are about the tenant, not the URL)
    for path in ("/jobs/{job_id}", "/jobs/{job_id}/artifacts/{name}", "/datasets/{dataset_id}"):
        assert rstack.http.get(fill(path, owned)).status_code == 200
    # lists never show another tenant's rows; another tenant's dataset cannot be trained on
    assert rstack.http.get("/jobs", headers=intruder).json()["data"] == []
    assert rstack.http.get("/datasets", headers=intruder).json()["data"] == []
    r = rstack.http.post("/jobs", headers=intruder, json=tiny_job(rstack, owned["dataset_id"]),
                         params={"queue": f"{rstack.queue}.parked"})
    assert r.status_code == 422 and "data.dataset_id" in r.text
    # paging cursors of another tenant give nothing
    assert rstack.http.get("/jobs", headers=intruder, params={"after": owned["job_id"]}).json()["data"] == []


def test_keys_hashed_never_logged_or_returned(rstack, owned):
    db = Path(rstack.env["TRINITY_DATA_DIR"]) / "trinity.db"
    rows = sqlite3.connect(db).execute("SELECT * FROM api_key").fetchall()
    stored = json.dumps(rows)
    for key in (rstack.key, rstack.other_key):
        assert key.startswith("trn_") and len(key) >= 40
        assert key not in stored and key[12:] not in stored  # only a 12-char prefix is kept
        assert hashlib.sha256(key.encode()).hexdigest() in stored
    listing = rstack.cli("keys", "list")
    assert rstack.key not in listing and rstack.key[:12] in listing
    # every response the API gave in this module, plus a few more, never echoes the key
    bodies = [rstack.http.get(p).text for p in ("/jobs", "/datasets", f"/jobs/{owned['job_id']}",
                                                f"/jobs/{owned['job_id']}/events")]
    bodies.append(httpx.get(rstack.base + "/jobs", headers={"Authorization": "Bearer trn_wrong"}).text)
    assert not any(rstack.key in b or rstack.other_key in b for b in bodies)
    time.sleep(0.5)
    for log in [rstack.api.log, *(p.log for p in rstack.workers.values())]:
        text = log.read_text(errors="replace")
        assert rstack.key not in text and rstack.other_key not in text and "trn_wrong" not in text


def test_key_comparison_is_constant_time_code_check():
    """A code check (timing cannot be measured reliably on shared cores): the stored hash is looked
    up by value and then compared with hmac.compare_digest; the API's key cache is keyed by the hash too
    (a dict lookup by the key itself would leak its prefix through timing)."""
    source = (ROOT / "trinity_service" / "security.py").read_text()
    assert re.search(r"(hmac|secrets)\.compare_digest\(", source)
    crud = (ROOT / "trinity_service" / "crud.py").read_text()
    assert "same_hash(" in crud and "hash_key(key)" in crud
    assert "hash_key(key)" in (ROOT / "api" / "auth.py").read_text()


# ── Bad input ────────────────────────────────────────────────────────────────────────────────

GOOD = json.dumps({"instruction": "What is 2+2?", "output": "4"})
CONV = lambda *msgs: json.dumps({"messages": [{"role": r, "content": c} for r, c in msgs]})  # noqa: E731

CORPUS = {  # name -> (filename, body, the row that must be named or None, words the error must name)
    "truncated_json": ("t.jsonl", f"{GOOD}\n{GOOD}\n{GOOD[:-9]}\n", 3, []),
    "wrong_types": ("t.jsonl", f"{GOOD}\n" + json.dumps({"instruction": 5, "output": ["x"]}) + "\n", 2,
                    ["instruction|output"]),
    "empty_assistant_turn": ("t.jsonl", CONV(("user", "hi"), ("assistant", "hello")) + "\n"
                             + CONV(("user", "hi"), ("assistant", "")) + "\n", 2, ["assistant|content|messages"]),
    # measured in tokens (tokenizer + max_seq_length fields): the 10 MB row is named as too long
    "ten_mb_single_line": ("t.jsonl", f"{GOOD}\n" + json.dumps({"instruction": "x " * (5 * 2**20), "output": "y"})
                           + "\n", 2, []),
    "invalid_utf8": ("t.jsonl", GOOD.encode() + b"\n" + b'{"instruction": "caf\xe9", "output": "x"}\n', 2, []),
    "unknown_format": ("t.jsonl", json.dumps({"foo": 1, "bar": 2}) + "\n" + json.dumps({"foo": 3, "bar": 4}) + "\n",
                       None, []),
    "duplicates": ("t.jsonl", f"{GOOD}\n{GOOD}\n{GOOD}\n", None, ["duplicate"]),
    "not_json_at_all": ("t.json", "[{\"instruction\": \"a\", \"output\": \"b\"}, {\"instr", None, []),
    "empty_file": ("t.jsonl", "", None, []),
    "csv_missing_column": ("t.csv", "instruction,output\nhello,world\nonly-one-field\n", 2, ["output"]),  # data row 2
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_malformed_dataset_is_refused_or_reported_by_row_and_field(rstack, case):
    filename, body, row, words = CORPUS[case]
    data = body.encode() if isinstance(body, str) else body
    fields = {"tokenizer": rstack.model, "max_seq_length": "64"} if case == "ten_mb_single_line" else None
    r = rstack.http.post("/datasets", files={"file": (filename, data)}, data=fields, timeout=180)
    assert r.status_code < 500, (case, r.status_code, r.text[:2000])
    payload = r.json()
    if r.status_code == 201:  # stored and reported: every bad row named
        errors = payload["report"]["errors"] if "report" in payload else payload.get("errors")
        assert payload["status"] == "invalid" or case == "duplicates", (case, payload)
        text = json.dumps(payload)
        if case == "duplicates":
            assert "duplicate" in text.lower(), (case, text[:2000])
            return
        assert errors, (case, payload)
        if row is not None:
            assert any(e.get("row") == row for e in errors), (case, errors)
        for e in errors:
            assert "row" in e and "field" in e and e.get("message"), e
        for alternatives in words:
            assert re.search(alternatives, json.dumps(errors)), (case, errors)
        assert str(Path(rstack.env["TRINITY_DATA_DIR"])) not in text  # no server paths
    else:
        assert 400 <= r.status_code < 500, (case, r.status_code)
        error = payload["error"]
        assert error["code"] in ("invalid_dataset", "unsupported_file_type", "invalid_upload"), error
        assert error["message"] and error["param"] == "file", error
        if row is not None:
            details = json.dumps(error.get("details")) + error["message"]
            assert f'"row": {row}' in details or f"row {row}" in details or f"line {row}" in details, (case, error)
        assert str(Path(rstack.env["TRINITY_DATA_DIR"])) not in r.text
    assert not list((Path(rstack.env["TRINITY_DATA_DIR"]) / "datasets" / ".tmp").glob("*"))


def test_ten_mb_line_without_a_tokenizer_is_stored_with_its_length(rstack):
    """Without a tokenizer lengths are in characters and no limit applies at upload (the job's
    max_seq_length cuts rows at training time): no 5xx, and the length shows in the stats."""
    body = f"{GOOD}\n" + json.dumps({"instruction": "x" * (10 * 2**20), "output": "y"}) + "\n"
    r = rstack.http.post("/datasets", files={"file": ("t.jsonl", body.encode())}, timeout=120)
    assert r.status_code == 201, r.text[:500]
    assert r.json()["rows"] == 2 and "10485" in json.dumps(r.json()["stats"])


def test_unsupported_file_type_is_422(rstack):
    r = rstack.http.post("/datasets", files={"file": ("evil.sh", b"rm -rf /\n")})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_file_type"


@pytest.mark.parametrize("megabytes", [MAX_UPLOAD_MB + 2, MAX_UPLOAD_MB + 40])
def test_oversize_upload_is_413_and_leaves_no_file(rstack, megabytes):
    """+2 MB: streamed, counted and cut (drained); +40 MB: refused from Content-Length, unread."""
    data_dir = Path(rstack.env["TRINITY_DATA_DIR"])
    before = {p for p in (data_dir / "datasets").rglob("*")}
    line = (GOOD + "\n").encode()
    body = line * (megabytes * 2**20 // len(line) + 1)
    r = rstack.http.post("/datasets", files={"file": ("big.jsonl", body)}, timeout=120)
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large", r.text[:500]
    after = {p for p in (data_dir / "datasets").rglob("*")}
    assert after - before <= {data_dir / "datasets" / ".tmp"}, after - before
    assert not list((data_dir / "datasets" / ".tmp").glob("*"))


def test_oversize_chunked_upload_without_length_is_413(rstack):
    """No Content-Length (chunked): the limit is enforced while streaming."""
    data_dir = Path(rstack.env["TRINITY_DATA_DIR"])
    boundary = "relboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    chunk = (GOOD + "\n").encode() * 20000  # ~1 MB

    def gen():
        yield head
        for _ in range(MAX_UPLOAD_MB + 30):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    r = rstack.http.post("/datasets", content=gen(), timeout=120,
                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413, r.text[:500]
    assert not list((data_dir / "datasets" / ".tmp").glob("*"))


TRAVERSAL = ["../secret.txt", "../../secret.txt", "..%2Fsecret.txt", "%2e%2e%2fsecret.txt", "%2e%2e/secret.txt",
             "%252e%252e%252fsecret.txt", "..%252f..%252fsecret.txt", "/etc/passwd", "%2Fetc%2Fpasswd",
             "adapter/../../secret.txt", "adapter/adapter_model.safetensors", "..\\secret.txt",
             "....//secret.txt", "%00adapter_model.safetensors", "adapter_model.safetensors%00.txt",
             "checkpoints/step-2", "%2e", "%2e%2e", "%2e%2e%2f%2e%2e%2fsecret.txt", "artifacts.json"]


def test_artifact_path_traversal_is_404(rstack, owned):
    base = f"{rstack.base}/jobs/{owned['job_id']}/artifacts/"
    for name in TRAVERSAL:
        # raw URL: httpx must not normalise the dots away
        r = rstack.http.get(httpx.URL(base + name) if "%" in name else base + name)
        assert r.status_code == 404, (name, r.status_code, r.text[:300])
        assert b"not for download" not in r.content and b"root:" not in r.content
    ok = rstack.http.get(base + owned["artifact"])
    assert ok.status_code == 200 and ok.content == b"weights" * 100


def test_artifact_manifest_pointing_outside_the_workdir_is_404(rstack, owned):
    """A tampered manifest (path ../../secret.txt) does not open the file either."""
    from trinity_core.artifacts import atomic_write_json, read_json

    r = rstack.http.post("/datasets", files={"file": ("train.jsonl", alpaca_rows(12))})
    job = rstack.submit(tiny_job(rstack, r.json()["id"]), queue=f"{rstack.queue}.parked")
    workdir = Path(rstack.env["TRINITY_DATA_DIR"]) / "jobs" / job["id"]
    workdir.mkdir(parents=True)
    atomic_write_json(workdir / "artifacts.json", [
        {"name": "escape", "path": "../../secret.txt", "kind": "report", "size": 16, "sha256": "x"},
        {"name": "abs", "path": "/etc/passwd", "kind": "report", "size": 1, "sha256": "x"}])
    assert read_json(workdir / "artifacts.json")
    for name in ("escape", "abs"):
        assert rstack.http.get(f"/jobs/{job['id']}/artifacts/{name}").status_code == 404


def test_out_of_range_spec_values_are_422(rstack, owned, tmp_path):
    outside = tmp_path / "model"
    outside.mkdir()
    cases = {
        "lora.r": {"lora": {"r": 0, "alpha": 16}},
        "train.learning_rate": {"train": {"learning_rate": -1e-4, "max_steps": 3}},
        "model.max_seq_length": {"model": {"name_or_path": rstack.model, "max_seq_length": 10**9}},
        "model.name_or_path": {"model": {"name_or_path": str(outside), "max_seq_length": 64}},
        "model.name_or_path ": {"model": {"name_or_path": rstack.model + "/../../../etc", "max_seq_length": 64}},
        "train.max_steps": {"train": {"max_steps": -5}},
        "data.path": {"data": {"path": "/etc/passwd"}},
    }
    for loc, patch in cases.items():
        body = tiny_job(rstack, owned["dataset_id"])
        for part, values in patch.items():
            body[part] = {**body[part], **values} if part != "data" else values
        r = rstack.http.post("/jobs", json=body, params={"queue": f"{rstack.queue}.parked"})
        assert r.status_code == 422, (loc, r.status_code, r.text)
        error = r.json()["error"]
        assert error["code"] == "invalid_spec" and any(d["loc"] == loc.strip() for d in error["details"]), (loc, error)
    # all problems at once
    body = tiny_job(rstack, owned["dataset_id"])
    body["lora"]["r"] = 0
    body["train"]["learning_rate"] = -1
    r = rstack.http.post("/jobs", json=body, params={"queue": f"{rstack.queue}.parked"})
    assert r.status_code == 422 and len(r.json()["error"]["details"]) >= 2
    # unknown queue
    r = rstack.http.post("/jobs", json=tiny_job(rstack, owned["dataset_id"]), params={"queue": "nope"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "queue"


# ── Property-based: schemathesis ─────────────────────────────────────────────────────────────

@pytest.mark.slow
def test_schemathesis_finds_no_5xx_and_responses_match_the_schema(rstack, owned, tmp_path):
    """`schemathesis run` against the live server with a valid key: every operation but the SSE
    stream, ≤25 examples each; jobs it creates go to the parked queue (no worker consumes it)."""
    import shutil
    import subprocess
    import sys

    beside = Path(sys.executable).parent / "schemathesis"  # the venv's, when it is not on PATH
    exe = str(beside) if beside.is_file() else shutil.which("schemathesis") or shutil.which("st")
    if exe is None:
        pytest.skip("schemathesis is not installed (pip install schemathesis)")
    report = tmp_path / "junit.xml"
    cmd = [exe, "--no-color", "run", f"{rstack.base}/openapi.json",
           "-H", f"Authorization: Bearer {rstack.key}",
           "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                       "response_schema_conformance,response_headers_conformance",
           "--max-examples", "10", "--exclude-path", "/jobs/{job_id}/events/stream",
           "--request-timeout", "20", "--workers", "1", "--seed", "1",
           "--report", "junit", "--report-junit-path", str(report),
           "--suppress-health-check", "all", "--phases", "examples,coverage,fuzzing", "--max-time", "100",
           "--no-shrink"]
    started = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,  # its .schemathesis/ cache
                         env={**rstack.env, "PATH": str(Path(sys.executable).parent) + ":" + rstack.env.get("PATH", "")})
    elapsed = time.monotonic() - started
    summary = out.stdout[-6000:] + out.stderr[-3000:]
    print(f"schemathesis took {elapsed:.0f} s\n{summary}")
    (tmp_path / "schemathesis.txt").write_text(out.stdout)
    assert "Server error" not in out.stdout and "ST1" not in out.stdout.replace("ST103", ""), summary
    undocumented = sorted(set(re.findall(r"Received: (\d+)", out.stdout)))
    assert out.returncode == 0, f"undocumented status codes {undocumented}:\n{summary}"
