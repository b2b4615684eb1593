"""`trinity serve` without Redis: API + worker on the embedded broker (kombu's SQLAlchemy transport
on a SQLite file). The job's dataset is a hub id with the hub offline, so it fails fast, after one
real retry through the broker, instead of training (test_lifecycle.py trains)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import alpaca_rows
from .live import ROOT, free_port, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def served(tiny_model_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRINITY_")}
    env.update({
        "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),  # 2 shared cores: spinning threads cost 7x
        "TRINITY_DATA_DIR": str(tmp_path / "data"),
        "TRINITY_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}",
        "TRINITY_MODEL_DIRS": str(Path(tiny_model_dir).parent), "TRINITY_MAX_RETRIES": "1",
        "TRINITY_RETRY_BACKOFF_S": "0.5",
    })
    key = subprocess.run([sys.executable, "-m", "cli", "keys", "create", "--tenant", "demo"], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.strip()
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port)], env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    yield proc, client, tmp_path / "serve.log"
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def healthy(client) -> bool:
    try:
        return client.get("/health").status_code == 200
    except httpx.HTTPError:
        return False


def test_serve_runs_jobs_through_the_embedded_broker(served, tiny_model_dir):
    proc, client, log = served
    wait_for(lambda: healthy(client), 60, "trinity serve")
    ds = client.post("/datasets", files={"file": ("train.jsonl", alpaca_rows(8))}).json()
    assert ds["status"] == "valid"
    body = {"model": {"name_or_path": str(tiny_model_dir), "max_seq_length": 64}, "lora": {"r": 8, "alpha": 16},
            "data": {"hub": "trinity-test/no-such-dataset"},
            "export": {"merge": False, "gguf": False, "evaluate": False}}
    job = client.post("/jobs", json=body).json()
    assert job["status"] == "queued", job

    done = wait_for(lambda: (j := client.get(f"/jobs/{job['id']}").json())["status"] == "failed" and j,
                    240, f"the job to fail\n{log.read_text(errors='replace')[-3000:]}", interval=1)
    assert done["error"]["code"] == "hub_download_failed" and done["error"]["param"] == "data.hub"
    events = client.get(f"/jobs/{job['id']}/events").json()["data"]
    statuses = [e["data"]["status"] for e in events if e["type"] == "status" and "status" in e["data"]]
    assert statuses == ["validating_files", "queued", "running", "queued", "running", "failed"]  # one retry
    assert any("retry 1" in e["message"] for e in events)

    proc.send_signal(signal.SIGTERM)  # stops the API and its worker
    proc.wait(60)
    time.sleep(1)
    leftover = subprocess.run(["pgrep", "-f", f"trinity-{proc.pid}@"], capture_output=True, text=True).stdout
    assert leftover.strip() == "", f"worker still running: {leftover}"
