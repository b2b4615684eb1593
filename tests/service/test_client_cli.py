"""The client commands (``cli/client.py``) run as a user runs them (``python -m cli ...`` in a
subprocess, stdout not a terminal) against the running service of ``live_service``."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from .conftest import alpaca_rows
from .live import ROOT, tiny_job, wait_for

pytestmark = pytest.mark.slow


def trinity(stack, *args: str, key: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**stack.env, "TRINITY_URL": stack.base, "TRINITY_API_KEY": key or stack.key}
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def write_spec(stack, tmp_path, **train) -> tuple:
    spec = tiny_job(stack, "unused", **train)
    spec["data"] = {"path": "ignored.jsonl", "format": "alpaca", "eval_fraction": 0.1}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    data = tmp_path / "train.jsonl"
    data.write_bytes(alpaca_rows(20))
    return path, data


def test_submit_wait_then_status_and_logs(live_service, tmp_path):
    stack = live_service
    spec, data = write_spec(stack, tmp_path, max_steps=2)
    out = trinity(stack, "submit", str(spec), "--data", str(data), "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].startswith("dataset ds-") and "valid, format alpaca, 20 rows" in lines[1]
    job_id = lines[2]
    assert job_id.startswith("ftjob-") and f"job {job_id} succeeded" in out.stderr
    job = stack.job(job_id)
    assert job["status"] == "succeeded" and job["spec"]["data"]["dataset_id"].startswith("ds-")
    assert job["spec"]["data"]["format"] == "alpaca" and "path" not in job["spec"]["data"]
    events = stack.events(job_id)
    followed = [line for line in lines[3:] if " #" in line]  # not a terminal: every event is a plain line
    assert [int(line.split("#")[1].split()[0]) for line in followed] == [e["seq"] for e in events]
    assert [line.split(maxsplit=2)[2] for line in followed].count("succeeded") == 1  # one ending, the last event
    assert followed[-1].endswith(" succeeded") and events[-1]["data"]["status"] == "succeeded"

    status = trinity(stack, "status", job_id)
    assert status.returncode == 0 and "succeeded" in status.stdout and "step 2/2" in status.stdout
    # the held-out loss during training (one evaluation: the last step) and the step that was exported
    assert "eval      loss " in status.stdout and "at step 2 (1 evaluation)" in status.stdout
    assert "exported  step 2 (best): the last step has the lowest eval loss" in status.stdout
    assert any(" eval loss " in line for line in followed)  # the eval event, as `trinity logs` prints it
    listing = trinity(stack, "status")
    assert any(row.split("\t")[:2] == [job_id, "succeeded"] for row in listing.stdout.splitlines())
    logs = trinity(stack, "logs", job_id)
    assert logs.returncode == 0 and logs.stdout.splitlines() == followed
    follow = trinity(stack, "logs", job_id, "-f")  # a finished job: the stream replays and ends
    assert follow.returncode == 0 and follow.stdout.splitlines() == followed


def test_download_resumes_and_checks_sha256(live_service, finished_job, tmp_path):
    stack, job_id = live_service, finished_job["id"]
    manifest = {a["name"]: a for a in stack.http.get(f"/jobs/{job_id}/artifacts").json()}
    gguf = next(name for name, a in manifest.items() if a["kind"] == "gguf")
    whole = stack.http.get(f"/jobs/{job_id}/artifacts/{gguf}").content

    out = trinity(stack, "download", job_id, "--artifact", "f16", "-o", str(tmp_path / "a"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "a" / gguf).read_bytes() == whole and "sha256" in out.stdout and "ok" in out.stdout

    part = tmp_path / "b" / f"{gguf}.part"  # an interrupted download: the first half is there
    part.parent.mkdir()
    part.write_bytes(whole[: len(whole) // 2])
    out = trinity(stack, "download", job_id, "--artifact", gguf, "-o", str(tmp_path / "b"))
    assert out.returncode == 0 and f"resuming at" in out.stdout, out.stdout + out.stderr
    assert (tmp_path / "b" / gguf).read_bytes() == whole and not part.exists()

    part = tmp_path / "c" / f"{gguf}.part"  # a corrupt partial file is caught by the checksum
    part.parent.mkdir()
    part.write_bytes(b"x" * (len(whole) // 2))
    out = trinity(stack, "download", job_id, "--artifact", gguf, "-o", str(tmp_path / "c"))
    assert out.returncode == 5 and "does not match" in out.stderr and not part.exists()

    out = trinity(stack, "download", job_id, "-o", str(tmp_path / "all"))  # everything, merged/ files included
    assert out.returncode == 0, out.stderr
    for name, artifact in manifest.items():
        assert hashlib.sha256((tmp_path / "all" / name).read_bytes()).hexdigest() == artifact["sha256"], name


def test_follow_survives_an_api_restart_and_cancel_gives_exit_code_3(live_service, tmp_path):
    stack = live_service
    spec, data = write_spec(stack, tmp_path, max_steps=300, save_steps=1000)
    out = trinity(stack, "submit", str(spec), "--data", str(data))
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.splitlines()[-1]
    env = {**stack.env, "TRINITY_URL": stack.base, "TRINITY_API_KEY": stack.key}
    follower = subprocess.Popen([sys.executable, "-m", "cli", "logs", job_id, "-f"], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (stack.job(job_id)["step"] or 0) >= 2, 180, "the job's second step")
        stack.api.stop()  # the stream drops; the follower reconnects with Last-Event-ID
        time.sleep(1)
        stack.start_api()
        wait_for(lambda: (stack.job(job_id)["step"] or 0) >= 4, 60, "two more steps")
        cancel = trinity(stack, "cancel", job_id)
        assert cancel.returncode == 0 and job_id in cancel.stdout
        stdout, stderr = follower.communicate(timeout=120)
    finally:
        follower.kill()
    assert follower.returncode == 3, stderr  # cancelled
    assert "reconnecting after event" in stderr and f"job {job_id} cancelled" in stderr
    seqs = [int(line.split("#")[1].split()[0]) for line in stdout.splitlines()]
    assert seqs == [e["seq"] for e in stack.events(job_id)]  # nothing lost, nothing twice
    assert trinity(stack, "status", job_id).returncode == 3


def test_errors_have_their_exit_codes(live_service, tmp_path):
    stack = live_service
    spec, data = write_spec(stack, tmp_path)
    env_less = subprocess.run([sys.executable, "-m", "cli", "status"], cwd=ROOT, capture_output=True, text=True,
                              env={k: v for k, v in stack.env.items() if k != "TRINITY_API_KEY"})
    assert env_less.returncode == 2 and "TRINITY_API_KEY" in env_less.stderr

    def datasets() -> set[str]:
        return {d["id"] for d in stack.http.get("/datasets", params={"limit": 100}).json()["data"]}

    before = datasets()
    out = trinity(stack, "submit", str(spec), "--data", str(data), "--queue", "gpu.nope")  # the service refuses
    assert out.returncode == 4 and "queue" in out.stderr and "deleted (no job uses it)" in out.stderr, out.stderr
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_bytes(alpaca_rows(5, bad=2))
    out = trinity(stack, "submit", str(spec), "--data", str(bad_data))
    assert out.returncode == 4 and "invalid" in out.stdout and "row 6" in out.stdout
    assert "deleted (no job uses it)" in out.stderr

    bad = yaml.safe_load(spec.read_text())
    bad["lora"] = {**bad["lora"], "r": -1, "rr": 8}
    bad["train"]["max_steps"] = "many"
    spec.write_text(yaml.safe_dump(bad))
    out = trinity(stack, "submit", str(spec), "--data", str(data))
    assert out.returncode == 4 and "invalid_spec" in out.stderr and "nothing was uploaded" in out.stderr
    assert "lora.r" in out.stderr and "train.max_steps" in out.stderr  # every problem, one per line
    assert "lora.rr: unknown field; did you mean lora.r?" in out.stderr
    assert "uploading" not in out.stdout and datasets() == before  # no orphan dataset from any refusal

    intruder = trinity(stack, "status", stack.dataset_id.replace("ds-", "ftjob-"), key=stack.other_key)
    assert intruder.returncode == 4 and "not_found" in intruder.stderr
    assert trinity(stack, "status", key="trn_wrong").returncode == 4
    assert json.loads(trinity(stack, "status", "--json", key=stack.other_key).stdout) == []
