"""trinity_core.model_config: a model's config is found (shipped → local dir → HF cache → hub) or
refused at once with the reason; the shipped 12B configs give the estimate the 12B shape offline."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.helpers import cache_hub_model
from trinity_core import model_config
from trinity_core.train import memory
from trinity_core.errors import ModelUnavailable
from trinity_core.spec import DEFAULT_MODEL, JobSpec

SHAPE_12B = {"hidden": 3840, "intermediate": 15360, "layers": 48, "heads": 16, "kv_heads": 8, "head_dim": 256,
             "vocab": 262208, "tied": True, "model_type": "gemma3_text"}  # Gemma-3-12B's text model


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No hub, and an empty Hugging Face cache."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


def reason(excinfo) -> str:
    return excinfo.value.details["reason"]


@pytest.mark.parametrize("name", [DEFAULT_MODEL, "google/gemma-3-12b-it"])
def test_shipped_configs_give_the_12b_shape_offline(offline, name):
    resolved = model_config.resolve(name)
    assert resolved.source == "shipped" and resolved.data["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert memory._shapes(model_config.load(name)) == SHAPE_12B  # google's short file: transformers' defaults


def test_the_default_model_is_the_prequantised_multimodal_checkpoint(offline):
    data = model_config.resolve(DEFAULT_MODEL).data
    q = data["quantization_config"]
    assert (q["quant_method"], q["bnb_4bit_quant_type"], q["bnb_4bit_use_double_quant"]) == \
        ("bitsandbytes", "nf4", True)
    assert {"lm_head", "vision_tower", "multi_modal_projector"} <= set(q["llm_int8_skip_modules"])
    assert data["vision_config"]["model_type"] == "siglip_vision_model"
    t0 = time.perf_counter()
    config = model_config.load(DEFAULT_MODEL)
    assert isinstance(config, dict) and time.perf_counter() - t0 < 0.5  # complete file: no transformers
    # memory reads the multimodal file's text_config exactly as a 12B text-only config
    from transformers import Gemma3TextConfig

    text = Gemma3TextConfig(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=256, vocab_size=262208)
    spec = JobSpec()
    for backend in ("unsloth", "peft"):
        parts = dict(memory.estimate(config, spec, backend).parts)
        assert 0.78 < parts.pop("vision") < 0.79  # SigLIP-so400m + projector, 0.42B parameters in 16 bits
        assert parts == memory.estimate(text, spec, backend).parts


def test_local_directories(tmp_path, offline):
    with pytest.raises(ModelUnavailable) as missing:
        model_config.resolve(str(tmp_path / "missing"))
    assert reason(missing) == "not_found" and missing.value.param == "model.name_or_path"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailable) as empty:
        model_config.resolve(str(tmp_path / "empty"), param="export.original_model")
    assert reason(empty) == "no_config" and empty.value.param == "export.original_model"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "hidden_size": 64}))
    assert model_config.resolve(str(tmp_path / "model"), need_weights=True).source == "local"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ModelUnavailable) as bad:
        model_config.resolve(str(tmp_path / "bad"))
    assert reason(bad) == "bad_config"


def test_unknown_hub_id_offline_fails_at_once_saying_what_to_do(offline):
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailable) as unknown:
        model_config.resolve("acme/no-such-model")
    assert time.perf_counter() - t0 < 2
    assert reason(unknown) == "not_cached" and unknown.value.code == "model_unavailable"
    for hint in ("TRINITY_MODEL_DIRS", "huggingface-cli download acme/no-such-model", "HF_HUB_OFFLINE"):
        assert hint in unknown.value.message
    with pytest.raises(ModelUnavailable) as invalid:  # what used to be "OSError: Repo id must be in the form"
        model_config.resolve("not a repo id!")
    assert reason(invalid) == "invalid_id"


def test_cache_and_weights(offline):
    cache_hub_model(offline, "acme/cached", {"config.json": json.dumps({"model_type": "llama"})})
    assert model_config.resolve("acme/cached").source == "cache"
    with pytest.raises(ModelUnavailable) as no_weights:  # a job needs the weights, not only the config
        model_config.resolve("acme/cached", need_weights=True)
    assert reason(no_weights) == "not_cached" and "config and weights" in no_weights.value.message
    cache_hub_model(offline, "acme/cached", {"model.safetensors": ""})
    assert model_config.resolve("acme/cached", need_weights=True).source == "cache"
    with pytest.raises(ModelUnavailable):  # shipped configs are no weights either
        model_config.resolve(DEFAULT_MODEL, need_weights=True)
    with pytest.raises(ModelUnavailable):  # nor are they used for another revision
        model_config.resolve(DEFAULT_MODEL, revision="v0")


class FakeHub(BaseHTTPRequestHandler):
    """Answers every request like the hub for a repository that does not exist, and counts them."""

    requests: list[str] = []

    def do_GET(self):  # noqa: N802
        FakeHub.requests.append(self.path)
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hub_allowed(offline, monkeypatch):
    """Hub access allowed, the hub being a local fake: yields a function giving its base URL."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeHub.requests = []
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_hub_allowed_one_short_request(hub_allowed, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub_allowed)
    with pytest.raises(ModelUnavailable) as missing:
        model_config.resolve("acme/no-such-model")
    assert reason(missing) == "not_found" and len(FakeHub.requests) == 1  # asked once, not retried
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: unreachable
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailable) as unreachable:
        model_config.resolve("acme/no-such-model")
    assert reason(unreachable) == "hub_unreachable" and time.perf_counter() - t0 < 2


def test_run_job_names_a_missing_model_before_loading_anything(tmp_path, offline):
    """The worker's side: a model directory gone since submission is model_unavailable (not retried),
    not transformers' "OSError: Repo id must be in the form ..." (an internal_error)."""
    from trinity_core.pipeline import run_job

    spec = JobSpec.model_validate({"model": {"name_or_path": str(tmp_path / "gone"), "backend": "peft"},
                                   "data": {"path": str(tmp_path / "train.jsonl")}})
    with pytest.raises(ModelUnavailable) as gone:
        run_job(spec, tmp_path / "work")
    assert reason(gone) == "not_found" and not gone.value.retryable
