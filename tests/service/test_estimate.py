"""POST /jobs/estimate: the pre-flight estimate per ladder rung, for the 12B shape on a T4."""

from __future__ import annotations

import pytest

from .conftest import new_tenant

GEMMA3_12B_TEXT = dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=256, vocab_size=262208, query_pre_attn_scalar=256)


@pytest.fixture
def model_12b(tmp_path, monkeypatch, settings):
    """Only the config of a 12B-shaped Gemma-3 (no weights): all the estimate reads."""
    from transformers import Gemma3TextConfig

    from trinity_service.settings import get_settings

    Gemma3TextConfig(**GEMMA3_12B_TEXT).save_pretrained(tmp_path / "gemma3-12b")
    monkeypatch.setenv("TRINITY_MODEL_DIRS", str(tmp_path))
    get_settings.cache_clear()
    return str(tmp_path / "gemma3-12b")


def _estimate(client, session, model, **params):
    _, headers = new_tenant(session)
    return client.post("/jobs/estimate", json={"model": {"name_or_path": model}}, params=params, headers=headers)


def test_t4_plan_for_the_seed_recipe(client, session, model_12b):
    r = _estimate(client, session, model_12b, gpu_gib=15.1, backend="unsloth")
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["name"] for x in body["rungs"]] == ["recipe", "seq_2048", "r_32", "dora_off", "targets_qv"]
    rungs = body["rungs"]
    for before, after in zip(rungs, rungs[1:]):  # every rung is cheaper than the one before, except
        if after["name"] == "dora_off":  # turning fast DoRA off on the T4 path: plain LoRA keeps PEFT's fp32 casts
            # of the adapters' inputs, which fast DoRA's cast path does not, and its estimate is the older fit (the
            # T4 path's fast DoRA was refitted 2026-11-29): more than fast DoRA's rung before it, less than the recipe
            assert before["gib"] < after["gib"] < rungs[0]["gib"], rungs
        else:
            assert after["gib"] < before["gib"], rungs
    assert body["start_rung"] == "recipe"  # Unsloth + fast DoRA: the full recipe fits a T4 (10.93 GiB measured)
    plain = _estimate(client, session, model_12b, gpu_gib=15.1, backend="peft").json()
    assert plain["rungs"][0]["gib"] > 20  # plain PEFT: fp32 logits over the 262k vocab
    assert plain["start_rung"] == "targets_qv"
    assert _estimate(client, session, model_12b, gpu_gib=4).json()["start_rung"] is None


def test_estimate_refuses_bad_input(client, session, model_12b, tmp_path):
    assert _estimate(client, session, "/etc").status_code == 422  # outside TRINITY_MODEL_DIRS
    r = _estimate(client, session, str(tmp_path / "missing"))
    assert r.status_code == 422 and r.json()["error"]["param"] == "model.name_or_path"
    _, headers = new_tenant(session)
    r = client.post("/jobs/estimate", json={"lora": {"r": 0}}, headers=headers)
    assert r.status_code == 422 and r.json()["error"]["param"] == "lora.r"
    assert client.post("/jobs/estimate", json={}).status_code == 401
