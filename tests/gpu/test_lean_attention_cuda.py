"""GPU-only: the lean Gemma-3 attention (trinity_core.train.lean_attention) against Unsloth's own float32-mode
attention, through Unsloth's T4 path on the tiny model (fp16 requested → Unsloth's float32 mode, 4-bit,
fast DoRA on all 7 projections, Unsloth's offloaded checkpointing). Run on the lent GPU:

    PYTHONPATH=.whl/site:. pytest -m gpu tests/gpu/test_lean_attention_cuda.py
    TRINITY_BENCH_MODEL=/tmp/m12b/L4 PYTHONPATH=.whl/site:. pytest -m gpu tests/gpu/test_lean_attention_cuda.py

In a child process: Unsloth's float32 mode patches transformers' classes for the life of the process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="needs unsloth (gpu extra)")]

CHILD = r"""
import json, os, sys
os.environ.setdefault("UNSLOTH_COMPILE_DISABLE", "1")  # what the backend sets with DoRA, before unsloth
import torch
from unsloth import FastLanguageModel

model, _ = FastLanguageModel.from_pretrained(model_name=sys.argv[1], max_seq_length=256, load_in_4bit=True,
                                             dtype=torch.float16, attn_implementation="eager")  # as the T4 rows
model = FastLanguageModel.get_peft_model(
    model, r=8, lora_alpha=16, lora_dropout=0.0, use_rslora=True, use_dora=True, bias="none", random_state=0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    use_gradient_checkpointing="unsloth", max_seq_length=256)
from trinity_core.train import lean_attention
from trinity_core.train.backends.unsloth import patch_lean_attention
from trinity_core.train.fast_dora import enable_fast_dora
from trinity_core.train.lean_norm import patch_gemma3_norms

report = {"float32_mode": os.environ.get("UNSLOTH_FORCE_FLOAT32"), "fast_dora": enable_fast_dora(model),
          "lean_norms": patch_gemma3_norms(model)}
with torch.no_grad():
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.02, generator=torch.Generator("cuda").manual_seed(0))
ids = torch.randint(7, model.config.vocab_size, (2, 200), generator=torch.Generator().manual_seed(0)).cuda()
model.train()

def step():
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                             if p.grad is not None}

loss, grads = step()
report["lean_attention"] = patch_lean_attention(model)
for groups in (1, 2):
    lean_attention.HEAD_GROUPS = groups
    lean_loss, lean_grads = step()
    assert lean_grads.keys() == grads.keys()
    report[f"groups_{groups}"] = {
        "loss": [loss, lean_loss], "grads": len(grads),
        "max_rel": max(((lean_grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item()
                       for n, g in grads.items()),
        "identical": sum(torch.equal(lean_grads[n], g) for n, g in grads.items())}
print("REPORT " + json.dumps(report))
"""


def test_same_loss_and_gradients_as_unsloths_attention(request):
    """On ``TRINITY_BENCH_MODEL`` where set (bench/gpu_bench.py's 12B-shaped layers), else the tiny model."""
    model_dir = os.environ.get("TRINITY_BENCH_MODEL") or str(request.getfixturevalue("tiny_model_dir"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", CHILD, model_dir], env=env, capture_output=True,
                          text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("REPORT "))
    print(report)
    layers = json.loads((Path(model_dir) / "config.json").read_text()).get("num_hidden_layers")
    assert report["float32_mode"] == "1" and report["fast_dora"] == 7 * layers and report["lean_attention"] == layers
    one = report["groups_1"]  # the same operations as Unsloth's forward: bit for bit
    assert one["loss"][0] == one["loss"][1] and one["identical"] == one["grads"] >= 3 * 7 * layers, one
    two = report["groups_2"]  # per head the same operations; SDPA's backward may sum in another order
    assert two["loss"][0] == two["loss"][1] and two["max_rel"] < 1e-2, two
