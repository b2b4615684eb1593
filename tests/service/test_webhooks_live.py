"""Webhooks on the running service of ``live_service``: a delivery whose receiver is down survives
a crash of the API (kill -9) and reaches the receiver, signed, once it and the API are back."""

from __future__ import annotations

import pytest

from .conftest import alpaca_rows
from .live import free_port, tiny_job, wait_for
from .receiver import Receiver

pytestmark = pytest.mark.slow


def test_a_delivery_survives_an_api_crash_while_the_receiver_is_down(live_service):
    stack = live_service
    key = stack.cli("keys", "create", "--tenant", "hooks")
    headers = {"Authorization": f"Bearer {key}"}
    port = free_port()  # the receiver is down
    endpoint = stack.http.post("/webhooks", headers=headers, json={"url": f"http://127.0.0.1:{port}/hook"}).json()
    dataset = stack.http.post("/datasets", headers=headers, files={"file": ("t.jsonl", alpaca_rows(8))})
    assert dataset.status_code == 201, dataset.text
    # a queue no worker of this stack consumes: the job waits there until it is cancelled (no training)
    r = stack.http.post("/jobs", headers=headers, json=tiny_job(stack, dataset.json()["id"]),
                        params={"queue": f"{stack.queue}.oom"})
    assert r.status_code == 201, r.text
    job = r.json()
    assert stack.http.post(f"/jobs/{job['id']}/cancel", headers=headers).json()["status"] == "cancelled"
    log_url = f"/webhooks/{endpoint['id']}/deliveries"
    tried = wait_for(lambda: [d for d in stack.http.get(log_url, headers=headers).json()["data"] if d["attempts"]],
                     30, "a first attempt")
    assert tried[0]["status"] == "pending" and "ConnectError" in tried[0]["log"][0]["error"]

    stack.api.kill()  # a crash: nothing is flushed
    stack.api.proc.wait(10)
    receiver = Receiver(port)
    try:
        receiver.secret = endpoint["secret"]
        stack.start_api()
        wait_for(lambda: receiver.received, 60, "the delivery after the restart")
        [got] = receiver.received
        assert got["type"] == "fine_tuning.job.cancelled" and got["data"]["id"] == job["id"] and not receiver.rejected
        [d] = stack.http.get(log_url, headers=headers).json()["data"]
        assert d["status"] == "delivered" and d["id"] == got["webhook_id"] and d["attempts"] >= 2
        assert d["log"][-1]["status_code"] == 200 and all("error" in e for e in d["log"][:-1])
    finally:
        receiver.close()
