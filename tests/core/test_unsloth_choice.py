"""Which compile a LoRA job on the Unsloth backend gets (``backends/unsloth.trinity_layers_for``): Trinity's compiled
decoder layers with Unsloth's compile mode off on a bf16 GPU for a 4-bit Gemma-3, Unsloth's compile mode otherwise.
Decided before Unsloth's import from the spec, the options, the GPU and the model's config.json; Unsloth itself is
not imported here (CPU), the GPU's answers are set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trinity_core import gpu
from trinity_core.options import RunOptions
from trinity_core.train.backends import unsloth as backend
from trinity_core.train import memory


@pytest.fixture
def bf16_gpu(monkeypatch):
    monkeypatch.setattr(gpu, "bf16_supported", lambda: True)
    monkeypatch.setattr(gpu, "compute_dtype", lambda name: torch.bfloat16 if name in ("auto", "bfloat16")
                        else getattr(torch, name))


def _lora(tiny_spec, **model):
    spec = tiny_spec.model_copy(deep=True)
    spec.lora.use_dora = False
    for key, value in model.items():
        setattr(spec.model, key, value)
    return spec


def test_a_lora_job_on_a_bf16_gpu_runs_trinity_layers(tiny_spec, bf16_gpu):
    spec = _lora(tiny_spec)
    config = json.loads((Path(spec.model.name_or_path) / "config.json").read_text())
    assert config["model_type"] in memory.COMPILED_LAYER_MODELS
    assert backend.trinity_layers_for(spec, RunOptions())
    assert backend._compile_reason(False, False, True) == "LoRA: Trinity's compiled layers instead"


@pytest.mark.parametrize("why", ["no bf16", "float16 spec", "16-bit base", "layers off", "kernels off",
                                 "switch off", "not gemma3", "no config"])
def test_otherwise_unsloths_compile(tiny_spec, bf16_gpu, monkeypatch, tmp_path, why):
    spec, options = _lora(tiny_spec), RunOptions()
    if why == "no bf16":
        monkeypatch.setattr(gpu, "bf16_supported", lambda: False)
    elif why == "float16 spec":
        spec.model.compute_dtype = "float16"
    elif why == "16-bit base":
        spec.model.load_in_4bit = False
    elif why == "layers off":
        options = RunOptions(compiled_layers=False)
    elif why == "kernels off":
        options = RunOptions(compiled_kernels=False)
    elif why == "switch off":
        monkeypatch.setattr(backend, "LORA_LAYERS", False)
    elif why == "not gemma3":
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
        spec.model.name_or_path = str(tmp_path)
    elif why == "no config":
        spec.model.name_or_path = str(tmp_path / "missing")
    assert not backend.trinity_layers_for(spec, options)
    assert backend._compile_reason(False, False, False) == f"{backend.COMPILE_ENV} set"


def test_the_multimodal_layout_is_read_from_its_text_config(tiny_spec, bf16_gpu, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3",
                                                      "text_config": {"model_type": "gemma3_text"}}))
    spec = _lora(tiny_spec, name_or_path=str(tmp_path))
    assert backend.trinity_layers_for(spec, RunOptions())


def test_the_memory_estimate_counts_the_layers_for_lora_too():
    """A LoRA job in the compiled layers keeps a layer's dequantised projections for its backward, as fast DoRA's
    does (+0.30 GiB measured at 48 layers of the 12B shape, H200 call 48); not on the T4 path, not for other models."""
    from tests.core.test_memory import GEMMA3_12B, _spec

    linear = sum(i * o for i, o in memory.projection_shapes(memory._shapes(GEMMA3_12B)).values())
    on = memory.estimate(GEMMA3_12B, _spec(), "unsloth")
    off = memory.estimate(GEMMA3_12B, _spec(), "unsloth", compiled_layers=False)
    assert (on.parts["transient"] - off.parts["transient"]) * memory.GIB == pytest.approx(linear * 2)
    assert on.assumptions["compiled_layers"]
    t4 = _spec(t4=True)
    assert memory.estimate(GEMMA3_12B, t4, "unsloth").gib == memory.estimate(
        GEMMA3_12B, t4, "unsloth", compiled_layers=False).gib
    llama = dict(GEMMA3_12B, model_type="llama")
    assert "compiled_layers" not in memory.estimate(llama, _spec(), "unsloth").assumptions


def test_the_recipes_model_chooses_trinity_layers(bf16_gpu):
    """The default spec's model (the published pre-quantised multimodal checkpoint) through its shipped config.json:
    no hub, no transformers import."""
    from trinity_core.spec import JobSpec

    spec = JobSpec()
    spec.lora.use_dora = False
    assert spec.model.name_or_path == "unsloth/gemma-3-12b-it-bnb-4bit"
    assert backend.trinity_layers_for(spec, RunOptions())


@pytest.mark.parametrize("unsloth_compile, counted", [(None, True), (False, True), (True, False)])
def test_the_ladders_preflight_counts_the_layers_only_where_they_run(tiny_spec, monkeypatch, unsloth_compile, counted):
    """Forcing Unsloth's compile mode (``RunOptions(unsloth_compile=True)``) leaves Trinity's layers out of the job,
    so the rung's estimate does not count their kept weights."""
    from types import SimpleNamespace

    from trinity_core.train import ladder

    seen = {}

    def preflight(spec, backend_name, **kw):
        seen.update(kw)
        return None

    monkeypatch.setattr(memory, "preflight", preflight)
    spec = _lora(tiny_spec)
    rung = ladder.rungs(spec)[0]
    attempt = ladder.Attempt(rung=rung.name, settings={})
    assert not ladder.skip_by_estimate(attempt, rung, spec, SimpleNamespace(name="unsloth"),
                                       RunOptions(unsloth_compile=unsloth_compile))
    assert seen["compiled_layers"] is counted
