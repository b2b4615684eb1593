"""POST /jobs is typed: its body is ``JobCreate`` (the spec's pydantic model) in openapi.json, every
field with its default and description; the stored spec is the validated one with every default
fixed at submit time; problems still come back all at once, with "did you mean"."""

from __future__ import annotations

from trinity_core.spec import JobSpec

from .conftest import job_body


def test_openapi_shows_the_spec_with_defaults_and_descriptions(client):
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/JobCreate"}
    parts = schema["components"]["schemas"]
    assert set(parts["JobCreate"]["properties"]) == set(JobSpec.model_fields)
    assert parts["JobCreate"]["additionalProperties"] is False and parts["JobCreate"]["examples"]
    for part, model in (("ModelSpec", "model"), ("LoraSpec", "lora"), ("TrainSpec", "train"), ("DataSpec", "data")):
        fields = JobSpec.model_fields[model].annotation.model_fields
        props = parts[part]["properties"]
        assert set(props) == set(fields)
        for name, field in fields.items():
            if field.description:
                assert props[name]["description"] == field.description, (part, name)
            if field.default is not None and not callable(field.default_factory):
                assert props[name]["default"] == field.default, (part, name)
    assert parts["ModelSpec"]["properties"]["max_seq_length"]["default"] == 4096
    assert parts["TrainSpec"]["properties"]["learning_rate"]["default"] == 2e-4


def test_the_stored_spec_is_normalised(client, auth, dataset_id):
    job = client.post("/jobs", headers=auth[1], json=job_body(dataset_id)).json()
    spec = client.get(f"/jobs/{job['id']}", headers=auth[1]).json()["spec"]
    for name, field in JobSpec.model_fields.items():  # every part, every field with a value: no default left open
        part = field.annotation
        if isinstance(part, type) and hasattr(part, "model_fields"):
            expected = {k for k, v in getattr(JobSpec(), name).model_dump().items() if v is not None}
            assert expected <= set(spec[name]), name
    assert spec["train"]["max_steps"] == 3 and spec["ladder"]["rungs"] == ["seq_2048", "r_32", "dora_off", "targets_qv"]
    assert JobSpec.model_validate(spec).model_dump(mode="json", exclude_none=True) == spec


def test_same_meaning_replays_an_idempotency_key(client, auth, dataset_id, enqueued):
    headers = {**auth[1], "Idempotency-Key": "schema-replay"}
    first = client.post("/jobs", headers=headers, json=job_body(dataset_id))
    explicit = job_body(dataset_id, train={"max_steps": 3, "learning_rate": 2e-4})  # the default, written out
    again = client.post("/jobs", headers=headers, json=explicit)
    assert (first.status_code, again.status_code) == (201, 200) and first.json()["id"] == again.json()["id"]


def test_unknown_fields_still_get_did_you_mean_not_a_framework_error(client, auth, dataset_id):
    body = job_body(dataset_id)
    body["lorra"] = body.pop("lora")
    r = client.post("/jobs", headers=auth[1], json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_spec" and error["param"] == "lorra"
    assert error["details"] == [{"loc": "lorra", "msg": "unknown field; did you mean lora?", "did_you_mean": "lora"}]
