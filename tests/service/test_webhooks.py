"""Webhooks in-process, on SQLite and PostgreSQL: endpoints, the outbox written with each job state
change, signed deliveries to a real HTTP receiver on 127.0.0.1 (verified with the
``standardwebhooks`` package), retries with backoff while it is down, the delivery log."""

from __future__ import annotations

import pytest

from trinity_service import crud
from trinity_service.states import JobStatus as S
from api.webhook_sender import send_due

from .conftest import job_body, new_tenant
from .docs import python_block
from .live import free_port
from .receiver import Receiver


@pytest.fixture(autouse=True)
def no_endpoints_left(session):
    """send_due sends every tenant's due deliveries: each test leaves none behind for the next."""
    from sqlmodel import select

    from trinity_service import webhooks
    from trinity_service.webhook_models import WebhookEndpoint

    yield
    for endpoint in session.exec(select(WebhookEndpoint)).all():
        webhooks.delete_endpoint(session=session, endpoint=endpoint)


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def register(client, headers, url, **fields):
    r = client.post("/webhooks", headers=headers, json={"url": url, **fields})
    assert r.status_code == 201, r.text
    return r.json()


def deliveries(client, headers, endpoint_id, **params):
    r = client.get(f"/webhooks/{endpoint_id}/deliveries", headers=headers, params=params)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def test_endpoints_register_list_and_delete(client, session, auth):
    endpoint = register(client, auth[1], "https://example.com/hook", events=["fine_tuning.job.failed"],
                        description="pager")
    assert endpoint["secret"].startswith("whsec_") and endpoint["events"] == ["fine_tuning.job.failed"]
    listed = client.get("/webhooks", headers=auth[1]).json()["data"]
    assert [e["id"] for e in listed] == [endpoint["id"]] and listed[0]["secret"] is None  # shown once
    assert client.get(f"/webhooks/{endpoint['id']}", headers=auth[1]).json()["url"] == "https://example.com/hook"
    _, other = new_tenant(session)
    assert client.get(f"/webhooks/{endpoint['id']}", headers=other).status_code == 404
    assert client.get("/webhooks", headers=other).json()["data"] == []
    for bad in ({"url": "ftp://x"}, {"url": "https://x", "events": ["fine_tuning.job.paused"]},
                {"url": "https://x", "events": []}):
        r = client.post("/webhooks", headers=auth[1], json=bad)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text
    assert client.delete(f"/webhooks/{endpoint['id']}", headers=other).status_code == 404
    assert client.delete(f"/webhooks/{endpoint['id']}", headers=auth[1]).status_code == 204
    assert client.get(f"/webhooks/{endpoint['id']}", headers=auth[1]).status_code == 404


def test_state_changes_are_signed_delivered_once_and_logged(client, session, auth, dataset_id, receiver):
    every = register(client, auth[1], receiver.url)
    failures = register(client, auth[1], receiver.url, events=["fine_tuning.job.failed"])
    receiver.secret = every["secret"]
    done = client.post("/jobs", headers=auth[1], json=job_body(dataset_id)).json()["id"]
    crud.claim_job(session=session, job_id=done, worker="w")
    crud.transition(session=session, job_id=done, to=S.succeeded, run_token=1)
    dropped = client.post("/jobs", headers=auth[1], json=job_body(dataset_id)).json()["id"]
    client.post(f"/jobs/{dropped}/cancel", headers=auth[1])
    _, other = new_tenant(session)  # another tenant's jobs never reach this endpoint
    client.post("/jobs", headers=other, json=job_body(client.post(
        "/datasets", headers=other, files={"file": ("t.jsonl", b'{"instruction": "a", "output": "b"}\n')}).json()["id"]))

    assert send_due()["delivered"] == 3
    assert receiver.rejected == [] and receiver.types(done) == ["fine_tuning.job.running", "fine_tuning.job.succeeded"]
    assert receiver.types(dropped) == ["fine_tuning.job.cancelled"]
    first = receiver.received[0]
    assert first["data"] == {"id": done, "object": "fine_tuning.job", "status": "running", "previous": "queued"}
    assert first["object"] == "event" and first["webhook_id"] == first["id"]
    assert send_due() == {"delivered": 0, "retrying": 0, "failed": 0}  # nothing twice
    log = deliveries(client, auth[1], every["id"])
    assert [d["type"] for d in log] == ["fine_tuning.job.cancelled", "fine_tuning.job.succeeded",
                                        "fine_tuning.job.running"]
    assert all(d["status"] == "delivered" and d["attempts"] == 1 and d["log"][0]["status_code"] == 200 for d in log)
    assert deliveries(client, auth[1], failures["id"]) == []  # it only wants failures

    # a failure's error rides along; the failures-only endpoint gets it too
    crud.transition(session=session, job_id=crud.claim_job(session=session, job_id=client.post(
        "/jobs", headers=auth[1], json=job_body(dataset_id)).json()["id"], worker="w").id, to=S.failed,
        run_token=1, values={"error": {"code": "training_failed", "message": "loss is NaN", "param": None}})
    send_due()
    assert receiver.received[-1]["data"]["error"]["code"] == "training_failed"
    assert [d["type"] for d in deliveries(client, auth[1], failures["id"])] == ["fine_tuning.job.failed"]
    assert len(receiver.rejected) == 1  # signed with the failures endpoint's own secret, not this receiver's


def test_a_receiver_down_for_a_while_gets_it_later_with_backoff(client, session, auth, dataset_id, settings):
    port = free_port()  # nothing listens there yet
    endpoint = register(client, auth[1], f"http://127.0.0.1:{port}/hook")
    job = client.post("/jobs", headers=auth[1], json=job_body(dataset_id)).json()["id"]
    client.post(f"/jobs/{job}/cancel", headers=auth[1])

    assert send_due() == {"delivered": 0, "retrying": 1, "failed": 0}
    [d] = deliveries(client, auth[1], endpoint["id"])
    assert d["status"] == "pending" and d["attempts"] == 1 and "ConnectError" in d["log"][0]["error"]
    assert d["next_attempt_at"] == pytest.approx(d["log"][0]["at"] + settings.webhook_retry_s)
    assert send_due()["retrying"] == 0  # not due yet: backoff
    assert send_due(at=d["next_attempt_at"])["retrying"] == 1
    [d] = deliveries(client, auth[1], endpoint["id"])
    assert d["next_attempt_at"] == pytest.approx(d["log"][1]["at"] + 2 * settings.webhook_retry_s)  # doubled

    receiver = Receiver(port)  # the receiver comes back
    try:
        receiver.secret = endpoint["secret"]
        assert send_due(at=d["next_attempt_at"])["delivered"] == 1
        [got] = receiver.received
        [d] = deliveries(client, auth[1], endpoint["id"], status="delivered")
        assert got["webhook_id"] == d["id"] and got["data"]["status"] == "cancelled"  # same id on every try
        assert d["attempts"] == 3 and [e.get("status_code") for e in d["log"]] == [None, None, 200]
        assert d["delivered_at"] and d["next_attempt_at"] is None
    finally:
        receiver.close()


def test_gives_up_after_max_attempts(client, session, auth, dataset_id, monkeypatch):
    from trinity_service.settings import get_settings

    receiver = Receiver(fail_first=10)
    try:
        endpoint = register(client, auth[1], receiver.url)
        receiver.secret = endpoint["secret"]
        job = client.post("/jobs", headers=auth[1], json=job_body(dataset_id)).json()["id"]
        client.post(f"/jobs/{job}/cancel", headers=auth[1])
        settings = get_settings().model_copy(update={"webhook_max_attempts": 2})
        assert send_due(settings)["retrying"] == 1
        assert send_due(settings, at=1e12) == {"delivered": 0, "retrying": 0, "failed": 1}
        [d] = deliveries(client, auth[1], endpoint["id"])
        assert d["status"] == "failed" and [e["status_code"] for e in d["log"]] == [500, 500]
        assert "HTTP 500" in d["log"][-1]["error"] and send_due(settings, at=1e13)["failed"] == 0
    finally:
        receiver.close()


def test_the_outbox_is_written_with_the_state_change(session, auth, dataset_id, client):
    """A delivery exists as soon as the transition commits: nothing is held in memory to be lost."""
    from sqlmodel import select

    from trinity_service.webhook_models import WebhookDelivery

    register(client, auth[1], "http://127.0.0.1:9/never")
    job = client.post("/jobs", headers=auth[1], json=job_body(dataset_id)).json()["id"]
    before = len(session.exec(select(WebhookDelivery).where(WebhookDelivery.job_id == job)).all())
    crud.claim_job(session=session, job_id=job, worker="w")
    rows = session.exec(select(WebhookDelivery).where(WebhookDelivery.job_id == job)).all()
    assert (before, [r.type for r in rows], rows[0].status) == (0, ["fine_tuning.job.running"], "pending")


def test_the_docs_verify_function_on_a_real_delivery(client, auth, dataset_id, receiver):
    from standardwebhooks.webhooks import WebhookVerificationError

    from trinity_service.webhook_models import new_secret

    example: dict = {}
    exec(compile(python_block("Webhooks"), "docs/API.md", "exec"), example)  # noqa: S102
    endpoint = register(client, auth[1], receiver.url)
    receiver.secret = endpoint["secret"]
    job = client.post("/jobs", headers=auth[1], json=job_body(dataset_id)).json()["id"]
    client.post(f"/jobs/{job}/cancel", headers=auth[1])
    send_due()
    body, headers = receiver.raw[-1]
    event = example["verify"](body, headers, endpoint["secret"])
    assert event["type"] == "fine_tuning.job.cancelled" and event["data"]["id"] == job
    for tampered, secret in ((body.replace(b"cancelled", b"succeeded"), endpoint["secret"]), (body, new_secret())):
        with pytest.raises(WebhookVerificationError):
            example["verify"](tampered, headers, secret)
