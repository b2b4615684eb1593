"""The official ``openai`` package (base_url=<service>/v1) against the running service of
``live_service``: upload, create, wait, events, checkpoints, the results file, cancel, and errors
surfaced as the SDK's exceptions. One short training run (4 steps, no export) plus one cancelled;
a webhook endpoint of the same tenant receives their state changes, signed (test_webhooks_live.py
covers a receiver that is down across an API crash)."""

from __future__ import annotations

import time

import openai
import pytest
from openai import OpenAI

from .conftest import alpaca_rows
from .docs import python_block
from .live import wait_for
from .receiver import Receiver

pytestmark = pytest.mark.slow


def trinity_spec() -> dict:
    """Trinity's own settings, riding along in extra_body (the model and data come from the request)."""
    return {"model": {"max_seq_length": 64}, "lora": {"r": 8, "alpha": 16, "use_dora": False},
            "train": {"max_steps": 4, "save_steps": 2, "warmup_steps": 1},
            "export": {"merge": False, "gguf": False, "evaluate": False}}


@pytest.fixture(scope="module")
def sdk(live_service):
    """An OpenAI client for a tenant of its own on the running service."""
    key = live_service.cli("keys", "create", "--tenant", "openai-sdk")
    return OpenAI(base_url=f"{live_service.base}/v1", api_key=key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def hooks(live_service, sdk):
    """A receiver on 127.0.0.1 registered for every job state change of the tenant."""
    receiver = Receiver()
    r = live_service.http.post("/webhooks", json={"url": receiver.url},
                               headers={"Authorization": f"Bearer {sdk.api_key}"})
    assert r.status_code == 201, r.text
    receiver.secret = r.json()["secret"]
    yield receiver
    receiver.close()


def wait_job(sdk: OpenAI, job_id: str, *statuses: str, timeout: float = 420):
    def check():
        job = sdk.fine_tuning.jobs.retrieve(job_id)
        assert job.status != "failed" or "failed" in statuses, job.error
        return job if job.status in statuses else None

    return wait_for(check, timeout, f"{job_id} to be {'/'.join(statuses)}")


def test_the_docs_example_then_events_checkpoints_results(live_service, sdk, hooks, tmp_path, monkeypatch, capsys):
    """Runs docs/API.md's "Use it from the openai SDK" example as written, then looks closer."""
    (tmp_path / "train.jsonl").write_bytes(alpaca_rows(24))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRINITY_URL", live_service.base)
    monkeypatch.setenv("TRINITY_API_KEY", sdk.api_key)
    monkeypatch.setenv("BASE_MODEL", live_service.model)
    example: dict = {}
    exec(compile(python_block("Use it from the openai SDK"), "docs/API.md", "exec"), example)  # noqa: S102
    out = capsys.readouterr().out.splitlines()
    file, done = example["file"], example["job"]
    assert (file.status, file.purpose, file.filename, file.bytes) == ("processed", "fine-tune", "train.jsonl",
                                                                      (tmp_path / "train.jsonl").stat().st_size)
    assert sdk.files.retrieve(file.id).id == file.id and file.id in [f.id for f in sdk.files.list()]
    assert sdk.files.content(file.id).read() == (tmp_path / "train.jsonl").read_bytes()
    job = done
    assert done.status == "succeeded" and out[0] == f"succeeded {done.fine_tuned_model} {done.trained_tokens}"
    assert done.seed == 11 and done.metadata == {"run": "e2e"} and done.organization_id == "openai-sdk"
    assert done.hyperparameters.batch_size == 2 and done.hyperparameters.learning_rate_multiplier == 2
    assert done.fine_tuned_model == f"ft:{live_service.model.rstrip('/').split('/')[-1]}:openai-sdk:sdk:{job.id}"
    assert done.trained_tokens > 0 and done.finished_at >= done.created_at and done.estimated_finish is None
    assert done.user_provided_suffix == "sdk" and "step,train_loss,learning_rate,grad_norm,tokens_per_s" in out
    native = live_service.http.get(f"/jobs/{job.id}", headers={"Authorization": f"Bearer {sdk.api_key}"}).json()
    assert native["spec"]["train"]["learning_rate"] == pytest.approx(4e-4)  # 2 × the default 2e-4
    assert (native["spec"]["train"]["batch_size"], native["spec"]["train"]["grad_accum"]) == (1, 2)

    first = sdk.fine_tuning.jobs.list_events(job.id, limit=3)
    assert len(first.data) == 3 and first.has_more
    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=3))  # the SDK pages with after=<last id>
    assert events[:3] == first.data and len({e.id for e in events}) == len(events)
    assert events[0].message == "succeeded" and events[-1].data["status"] == "validating_files"
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == [4, 3, 2, 1] and all(e.data["train_loss"] > 0 for e in metrics)

    checkpoints = sdk.fine_tuning.jobs.checkpoints.list(job.id)
    assert [c.step_number for c in checkpoints.data] == [4, 2]
    assert checkpoints.data[0].metrics.train_loss == pytest.approx(metrics[0].data["loss"])
    valid = [e for e in events if "valid_loss" in e.data]  # the held-out loss at the last step (eval event)
    assert [e.data["step"] for e in valid] == [4] and checkpoints.data[0].metrics.valid_loss == valid[0].data["valid_loss"]
    assert checkpoints.data[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-4"

    [results] = done.result_files
    assert sdk.files.retrieve(results).purpose == "fine-tune-results"
    rows = sdk.files.content(results).text.splitlines()
    assert rows[0].startswith("step,train_loss") and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    assert job.id in [j.id for j in sdk.fine_tuning.jobs.list(limit=5)]

    wait_for(lambda: len(hooks.types(job.id)) == 2, 30, "the webhooks")
    assert hooks.types(job.id) == ["fine_tuning.job.running", "fine_tuning.job.succeeded"] and not hooks.rejected


def test_cancel_a_running_job(live_service, sdk, hooks, tmp_path):
    file = sdk.files.create(file=("train.jsonl", alpaca_rows(24)), purpose="fine-tune")
    spec = trinity_spec()
    spec["train"].update(max_steps=500, save_steps=100)
    job = sdk.fine_tuning.jobs.create(model=live_service.model, training_file=file.id, extra_body={"trinity_spec": spec})
    wait_for(lambda: (live_service.http.get(f"/jobs/{job.id}", headers={"Authorization": f"Bearer {sdk.api_key}"})
                      .json().get("step") or 0) >= 1, 300, "a first step")
    cancelled = sdk.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status in ("running", "cancelled")  # running while the worker reaches the step boundary
    started = time.monotonic()
    assert wait_job(sdk, job.id, "cancelled", timeout=120).finished_at
    assert time.monotonic() - started < 60
    with pytest.raises(openai.ConflictError) as error:
        sdk.fine_tuning.jobs.cancel(job.id)
    assert error.value.code == "job_finished"
    wait_for(lambda: len(hooks.types(job.id)) == 2, 30, "the webhooks")
    assert hooks.types(job.id) == ["fine_tuning.job.running", "fine_tuning.job.cancelled"] and not hooks.rejected


def test_errors_are_the_sdks_exceptions(live_service, sdk):
    with pytest.raises(openai.BadRequestError) as bad_file:
        sdk.files.create(file=("broken.jsonl", b"{nope\n{nope\n"), purpose="fine-tune")
    assert bad_file.value.code == "invalid_dataset" and bad_file.value.param == "file"
    good = sdk.files.create(file=("ok.jsonl", alpaca_rows(8)), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as bad_hp:
        sdk.fine_tuning.jobs.create(model=live_service.model, training_file=good.id,
                                    hyperparameters={"n_epochs": 0}, extra_body={"trinity_spec": trinity_spec()})
    assert bad_hp.value.param == "hyperparameters.n_epochs" and bad_hp.value.type == "invalid_request_error"
    assert "'auto' or an integer" in bad_hp.value.message
    with pytest.raises(openai.BadRequestError) as typo:
        sdk.fine_tuning.jobs.create(model=live_service.model, training_file=good.id,
                                    extra_body={"trinity_spec": {"lora": {"rr": 8}}})
    assert "did you mean lora.r?" in typo.value.message and typo.value.param == "lora.rr"
    with pytest.raises(openai.BadRequestError) as missing:
        sdk.fine_tuning.jobs.create(model=live_service.model, training_file="file-nope")
    assert missing.value.param == "training_file"
    with pytest.raises(openai.NotFoundError):
        sdk.fine_tuning.jobs.retrieve("ftjob-nope")
    with pytest.raises(openai.AuthenticationError) as auth:
        OpenAI(base_url=f"{live_service.base}/v1", api_key="trn_wrong", max_retries=0).files.list()
    assert auth.value.code == "invalid_api_key"
