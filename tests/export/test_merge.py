"""The merge reproduces the trained model (4-bit base + adapter) and matches PEFT's own merge."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from tests.export.export_helpers import FIDELITY, hf_greedy, hf_logits
from trinity_core.errors import ExportError
from trinity_core.export.merge import Quant, bnb_linear_names, load_adapter, merge_adapter, nf4_roundtrip, shard_files

def _bnb_config(dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def _load_4bit(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    from trinity_core import nf4

    return nf4.exact_on_cpu(AutoModelForCausalLM.from_pretrained(path, quantization_config=_bnb_config(dtype),
                                                                 dtype=dtype))


def _weights(model_dir) -> dict[str, torch.Tensor]:
    out = {}
    for shard in shard_files(model_dir):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_roundtrip_is_what_bitsandbytes_loaded(sharded_base, dtype):
    """Re-quantising the 16-bit weights reproduces every Linear4bit's dequantised weight exactly,
    and the set of quantised modules is the one transformers converted."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from trinity_core.export.merge import _meta_model

    model = _load_4bit(sharded_base, dtype)
    loaded = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert bnb_linear_names(_meta_model(sharded_base)) == set(loaded)
    weights = _weights(sharded_base)
    quant = Quant(dtype=str(dtype).removeprefix("torch."))
    for name, module in loaded.items():
        expected = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
        assert torch.equal(nf4_roundtrip(weights[f"{name}.weight"], quant), expected), name


def test_adapter_is_read_with_rslora_scaling_and_dora(workdir, export_spec):
    config, deltas = load_adapter(workdir / "adapter")
    assert len(deltas) == 42
    assert all(d.scaling == pytest.approx(32 / 16**0.5) for d in deltas.values())  # rsLoRA: alpha/sqrt(r)
    assert all(d.magnitude is not None for d in deltas.values())
    assert config["use_rslora"] and config["use_dora"]


def test_merged_layout(exported, workdir, sharded_base):
    result, events = exported
    merged = workdir / "merged"
    info = json.loads((merged / "trinity_merge.json").read_text())
    assert info == result["merge"]
    assert info["merge_into"] == "dequantized" and info["quant"]["quant_type"] == "nf4"
    assert info["merged"] == 42 and info["requantized"] == 42 and info["dtype"] == "float32"
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    tok_config = json.loads((merged / "tokenizer_config.json").read_text())
    decoder = {v["content"]: int(k) for k, v in tok_config["added_tokens_decoder"].items()}
    assert decoder["<start_of_turn>"] == 5 and decoder["<end_of_turn>"] == 6
    for name in ("generation_config.json", "tokenizer.json", "tokenizer.model", "chat_template.jinja"):
        assert (merged / name).is_file(), name
    assert set(_weights(merged)) == set(_weights(sharded_base))
    assert not [p for p in workdir.iterdir() if ".tmp-" in p.name]
    assert any(e["type"] == "status" and e.get("stage") == "merge" for e in events)


def test_each_input_shard_becomes_one_output_shard(exported, workdir, sharded_base):
    merged_index = json.loads((workdir / "merged" / "model.safetensors.index.json").read_text())
    base_index = json.loads((sharded_base / "model.safetensors.index.json").read_text())
    assert len(set(base_index["weight_map"].values())) == 8
    assert merged_index["weight_map"] == base_index["weight_map"]  # same names, same grouping
    assert merged_index["metadata"]["total_size"] == base_index["metadata"]["total_size"]  # fp32 -> fp32
    assert exported[0]["merge"]["shards"] == 8
    assert [e["shard"] for e in exported[1] if "shard" in e] == list(range(1, 9))


def test_dequantized_merge_reproduces_the_trained_model(trained_model, merged_model, probe_ids):
    trained = hf_logits(trained_model, probe_ids)
    merged = hf_logits(merged_model, probe_ids)
    with trained_model.disable_adapter():
        base = hf_logits(trained_model, probe_ids)
    FIDELITY["merge_dequantized_max_abs"] = diff = (trained - merged).abs().max().item()
    FIDELITY["adapter_effect_max_abs"] = effect = (trained - base).abs().max().item()
    assert effect > 0.05, "the adapter should change the model, or this test proves nothing"
    assert diff < 1e-4
    assert hf_greedy(trained_model, probe_ids, 8) == hf_greedy(merged_model, probe_ids, 8)


@pytest.fixture(scope="module")
def original_merge(workdir, sharded_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("orig") / "merged"
    return out, merge_adapter(workdir / "adapter", out, base_model=sharded_base, merge_into="original",
                              original_model=sharded_base)


def test_original_merge_equals_peft_merge_and_unload(original_merge, sharded_base, workdir, probe_ids,
                                                     trained_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, info = original_merge
    assert info["merge_into"] == "original" and info["requantized"] == 0 and info["quant"] is None
    fp32 = AutoModelForCausalLM.from_pretrained(sharded_base, dtype=torch.float32)
    reference = PeftModel.from_pretrained(fp32, str(workdir / "adapter")).merge_and_unload().eval()
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref_weights = reference.state_dict()
    for key, value in _weights(out).items():
        torch.testing.assert_close(value, ref_weights[key], rtol=1e-6, atol=1e-6, msg=key)
    FIDELITY["merge_original_vs_peft_max_abs"] = (hf_logits(reference, probe_ids)
                                                  - hf_logits(ours, probe_ids)).abs().max().item()
    FIDELITY["merge_original_vs_trained_max_abs"] = rounding = (hf_logits(trained_model, probe_ids)
                                                                - hf_logits(ours, probe_ids)).abs().max().item()
    assert FIDELITY["merge_original_vs_peft_max_abs"] < 1e-5
    assert rounding > 1e-3  # NF4 rounding: merging into the original weights is not the trained model


def test_prequantized_base_is_dequantized_from_its_quant_state(workdir, sharded_base, tmp_path, probe_ids,
                                                               exported):
    """A ``*-bnb-4bit`` checkpoint (packed uint8 + absmax/quant_map/nested_*/quant_state keys)."""
    from peft import PeftModel

    bnb_dir = tmp_path / "base-bnb-4bit"
    _load_4bit(sharded_base).save_pretrained(bnb_dir, max_shard_size="1MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja"):
        shutil.copyfile(sharded_base / name, bnb_dir / name)  # a hub bnb-4bit repo ships its tokenizer
    keys = set(_weights(bnb_dir))
    assert "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4" in keys
    assert "model.layers.0.mlp.down_proj.weight.nested_absmax" in keys
    out, said = tmp_path / "merged", []
    info = merge_adapter(workdir / "adapter", out, base_model=bnb_dir, emit=lambda message, **_: said.append(message))
    assert info["dequantized"] == 42 and info["requantized"] == 0
    assert said[-1].startswith(  # where it went, not "into" the base (which is only read)
        f"merged {info['merged']} LoRA modules of {workdir / 'adapter'} into the dequantised base {bnb_dir} → {out} in ")
    # the same NF4 weights as re-quantising the 16-bit base: the same merged model
    for key, value in _weights(out).items():
        assert torch.equal(value, _weights(workdir / "merged")[key]), key
    trained = PeftModel.from_pretrained(_load_4bit(bnb_dir), str(workdir / "adapter")).eval()
    from trinity_core.evaluate.run import load_merged_model

    diff = (hf_logits(trained, probe_ids) - hf_logits(load_merged_model(out), probe_ids)).abs().max().item()
    FIDELITY["merge_prequantized_max_abs"] = diff
    assert diff < 1e-4


def test_unknown_adapter_module_is_an_export_error(workdir, sharded_base, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "adapter"
    shutil.copytree(workdir / "adapter", bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    tensors = {k.replace("layers.0.", "layers.99."): v for k, v in tensors.items()}
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(ExportError, match="not found"):
        merge_adapter(bad, tmp_path / "merged", base_model=sharded_base)
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]



def test_prequantized_weight_is_dequantized_in_the_trained_models_dtype():
    """A pre-quantised checkpoint serialises its quant state's dtype (bf16 in unsloth's); the merge
    dequantises in the dtype the trained model used (``nf4.dequant_dtype_of``), also when that is the
    compute dtype (fp16 under Unsloth's T4 path): ``quant_of`` used to drop it then, and the merge fell
    back to the file's bf16."""
    import bitsandbytes.functional as bnbf

    from trinity_core.export.merge import dequantize_prequantized
    from trinity_core.export.run import quant_of
    from trinity_core.spec import JobSpec

    torch.manual_seed(0)
    packed, state = bnbf.quantize_4bit(torch.randn(64, 128, dtype=torch.bfloat16) * 0.02, blocksize=64,
                                       compress_statistics=True, quant_type="nf4")
    stats = {k.removeprefix("weight."): v for k, v in state.as_dict(packed=True).items()}
    quant = quant_of(JobSpec(), compute_dtype="float16", dequant_dtype="float16")
    assert quant.dequant_dtype == "float16"
    assert dequantize_prequantized(packed, stats, quant).dtype == torch.float16
    assert dequantize_prequantized(packed, stats).dtype == torch.bfloat16  # no trained model: the file's


@pytest.mark.parametrize("precision", ["highest", "medium"])
def test_the_merge_delta_is_the_float64_product_rounded_once(precision):
    """Whatever fp32 matmul precision the process set (Unsloth lowers it; oneDNN then multiplies in
    bf16 on a CPU with AMX, as on the H200 host), the merge's ``B @ A`` is the float64 product rounded
    once, the same bits the merged-weights check computes; a plain fp32 matmul is not."""
    from trinity_core.export.merge import Delta, exact_product

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 512, generator=gen), torch.randn(300, 64, generator=gen) * 0.01
    weight, magnitude = torch.randn(300, 512, generator=gen) * 0.02, torch.rand(300, generator=gen) + 0.5
    want = (b.double() @ a.double()).float()
    assert not torch.equal(b @ a, want)  # the test can tell the two apart
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        assert torch.equal(exact_product(b, a), want)
        w = weight + want * 0.5
        expected = (magnitude / torch.linalg.norm(w, dim=1)).view(-1, 1) * w
        assert torch.equal(Delta(a, b, 0.5, magnitude).apply(weight), expected)
        assert torch.equal(Delta(a.bfloat16(), b.bfloat16(), 0.5).apply(weight),
                           weight + (b.bfloat16().double() @ a.bfloat16().double()).float() * 0.5)
    finally:
        torch.set_float32_matmul_precision(before)


def test_the_merge_does_its_4bit_arithmetic_on_the_trained_models_device_when_it_has_it():
    """``Quant.device`` names where training quantised (the H200 host's CPU kernels rounded otherwise);
    a process without that device (an export resumed on a CPU box) falls back to the CPU, and the result
    comes back on the input's device either way."""
    from trinity_core.export.merge import Quant

    assert Quant(device="cuda:0").on() == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    assert Quant(device=None).on() == Quant(device="cpu").on() == torch.device("cpu")
    weight = torch.randn(64, 128) * 0.02
    out = nf4_roundtrip(weight, Quant(dtype="float32", device="cuda"))
    assert out.device == weight.device and torch.equal(out, nf4_roundtrip(weight, Quant(dtype="float32")))
