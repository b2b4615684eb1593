"""QLoRA + rsLoRA + DoRA on the tiny Gemma-3: what the adapter is, and that training moves it."""

import math

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import make_spec
from trinity_core.train.backends.peft import PeftBackend

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("r", [16, 64])
def test_rslora_scaling_is_alpha_over_sqrt_r(tiny_spec, r):
    model, _ = PeftBackend().load(make_spec(tiny_spec, **{"lora.r": r, "lora.alpha": 32}))
    scalings = [m.scaling["default"] for m in _lora_layers(model).values()]
    assert len(scalings) == 42
    assert scalings == pytest.approx([32 / math.sqrt(r)] * 42)


def test_all_seven_projections_are_4bit_with_lora_and_dora(tiny_spec):
    import bitsandbytes as bnb

    model, _ = PeftBackend().load(tiny_spec)
    layers = _lora_layers(model)
    n_layers = model.config.num_hidden_layers
    assert len(layers) == 7 * n_layers == 42
    for i in range(n_layers):
        for proj in PROJECTIONS:
            [name] = [n for n in layers if n.endswith(f"layers.{i}.{'self_attn' if proj in PROJECTIONS[:4] else 'mlp'}.{proj}")]
            layer = layers[name]
            assert isinstance(layer.base_layer, bnb.nn.Linear4bit), name
            assert layer.base_layer.weight.quant_state.quant_type == "nf4"
            assert layer.r["default"] == tiny_spec.lora.r
            # DoRA: one magnitude vector per layer, one entry per output feature
            magnitude = layer.lora_magnitude_vector["default"].weight
            assert magnitude.shape == (layer.base_layer.out_features,)


def test_loss_falls(trained_run):
    result, _, _ = trained_run
    losses = [h["loss"] for h in result.loss_history]
    assert len(losses) == result.global_step == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last <= 0.7 * first, (first, last)


def test_every_trainable_parameter_changed(trained_run, tiny_spec):
    """Compare the saved adapter with the same seeded initialisation, tensor by tensor."""
    from peft import get_peft_model_state_dict

    result, workdir, _ = trained_run
    model, _ = PeftBackend().load(tiny_spec)  # same seed -> same initial A, zero B, magnitude = ||W||
    initial = {k: v.detach().float() for k, v in get_peft_model_state_dict(model).items()}
    trained = load_file(str(workdir / "adapter" / "adapter_model.safetensors"))
    assert set(initial) == set(trained)
    magnitudes = [k for k in trained if "lora_magnitude_vector" in k]
    assert len(magnitudes) == 42
    unchanged = [k for k in trained if torch.equal(initial[k], trained[k].float())]
    assert unchanged == []


def test_adapter_reloads_with_same_logits(tiny_spec, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tokenizer = PeftBackend().load(tiny_spec)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # make B (zero at init) and the magnitudes non-trivial
    model.eval()
    ids = tokenizer("The capital of France is Paris.", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")

    base = AutoModelForCausalLM.from_pretrained(
        tiny_spec.model.name_or_path, quantization_config=model.base_model.model.config.quantization_config,
        dtype=torch.float32)
    from trinity_core import nf4  # as every CPU load of a 4-bit model in trinity_core

    reloaded = PeftModel.from_pretrained(nf4.exact_on_cpu(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        after = reloaded(ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_result_records_what_ran(trained_run):
    import json

    result, workdir, _ = trained_run
    saved = json.loads((workdir / "result.json").read_text())
    assert saved["backend"]["backend"] == "peft"
    assert saved["attempts"] == [dict(saved["attempts"][0], rung="recipe", outcome="ok")]
    assert saved["final_rung"] == "recipe"
    assert saved["resolved_spec"]["lora"]["use_dora"] is True
    assert len(saved["data"]["sha256"]) == 64
    assert {"torch", "transformers", "peft", "trl", "bitsandbytes"} <= set(saved["libraries"])
    assert (workdir / "adapter" / "adapter_config.json").is_file()
    assert [p.name for p in (workdir / "checkpoints").iterdir() if p.name.startswith("step-")]


def test_metrics_events_carry_progress(trained_run):
    _, _, events = trained_run
    metrics = [e for e in events if e.type == "metrics"]
    assert len(metrics) == 30
    last = metrics[-1].data
    assert last["step"] == last["total_steps"] == 30
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "eta_s", "peak_mem_gib", "elapsed_s"):
        assert key in last
    assert last["tokens_per_s"] > 0 and last["peak_mem_gib"] > 0
    assert [e.seq for e in events] == sorted(e.seq for e in events)


def test_run_job_says_it_finished_without_a_terminal_status(trained_run):
    """The job's one terminal status event is its owner's (the worker's transition); run_job ends on a message."""
    result, _, events = trained_run
    assert events[-1].type == "message" and events[-1].message == f"finished: {len(result.artifacts)} artifacts"
    assert not [e for e in events if e.type == "status" and e.message in ("succeeded", "failed", "cancelled")]
