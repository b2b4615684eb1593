"""GPU-only: the Unsloth backend through run_job, fast DoRA in bf16 on CUDA, and the OOM ladder
on genuine CUDA OOMs under an emulated T4. Run on the lent GPU (docs/BENCHMARKS.md):

    PYTHONPATH=.whl/site:. pytest -m gpu tests/gpu -x
    TRINITY_BENCH_MODEL=/tmp/m12b/L4 TRINITY_BENCH_OUT=$OUT pytest -m gpu tests/gpu   # + the ladder

Skipped without CUDA (CI). Unsloth patches transformers when first imported, so the plain-PEFT
test comes first in this file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path

import pytest
import torch

from tests.helpers import make_spec, run_job_as_the_worker

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
needs_unsloth = pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="needs unsloth (gpu extra)")
NO_EXPORT = {"export.merge": False, "export.gguf": False, "export.evaluate": False, "train.save_steps": 100}


def test_fast_dora_matches_peft_dora_in_bf16(tiny_spec, monkeypatch):
    """bf16 on CUDA: logits and loss of fast DoRA vs PEFT's DoRA on the 4-bit tiny Gemma-3, B
    non-zero. Tolerance 5e-2 of the logit scale (seen 2026-11-25 on an H200: 0.035 / 1.45 = 2.4%):
    PEFT rounds each row norm to bf16 (up to 2⁻⁹ relative, so m/‖·‖ moves by as much in each of 6
    layers) while fast DoRA keeps it in fp32, and the two sum the terms in another order in bf16."""
    import copy

    from trinity_core.options import RunOptions
    from trinity_core.train.backends.peft import PeftBackend
    from trinity_core.train.fast_dora import enable_fast_dora

    ref, _ = PeftBackend(RunOptions(fast_dora=False)).load(make_spec(tiny_spec, **{"model.compute_dtype": "bfloat16"}))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    fast = copy.deepcopy(ref)
    assert enable_fast_dora(fast) == 42
    ids = torch.randint(7, fast.config.vocab_size, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = fast(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    scale = b.logits.float().abs().max()
    assert (a.logits.float() - b.logits.float()).abs().max() <= 5e-2 * scale
    assert abs(a.loss.item() - b.loss.item()) <= 1e-2 * abs(b.loss.item())


@needs_unsloth
def test_run_job_with_unsloth_on_the_tiny_model(tiny_spec, tmp_path):
    from safetensors.torch import load_file

    from trinity_core.pipeline import run_job

    spec = make_spec(tiny_spec, **{"model.backend": "unsloth", "train.max_steps": 6, **NO_EXPORT})
    result = run_job(spec, tmp_path)
    assert result.backend["backend"] == "unsloth"
    assert result.backend["fast_dora_layers"] == 42
    assert [a["outcome"] for a in result.attempts] == ["ok"]
    losses = [h["loss"] for h in result.loss_history]
    assert len(losses) == 6 and all(x == x for x in losses) and losses[-1] < losses[0]
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sum("lora_magnitude_vector" in k for k in weights) == 42
    assert sum("lora_A" in k for k in weights) == sum("lora_B" in k for k in weights) == 42


@needs_unsloth
@pytest.mark.skipif(not torch.cuda.is_available() or not torch.cuda.is_bf16_supported(), reason="needs bf16")
def test_a_lora_job_runs_trinitys_compiled_layers(tiny_spec, tmp_path):
    """A LoRA job on a bf16 GPU: the backend turns Unsloth's compile mode off and compiles Trinity's decoder
    layers (backends/unsloth.trinity_layers_for); in a fresh process without UNSLOTH_COMPILE_DISABLE, as the
    worker's. Call 53 (H200): 20 steps, loss 6.99 -> 3.98 (bench/gpu_session_calls.sh lorajob)."""
    spec = make_spec(tiny_spec, **{"model.backend": "unsloth", "lora.use_dora": False, "train.max_steps": 6,
                                   **NO_EXPORT})
    out = run_job_as_the_worker(spec, tmp_path / "job", tmp_path)
    info = out["backend"]
    assert info["unsloth_compile"] is False and info["unsloth_compile_reason"] == "LoRA: Trinity's compiled layers instead"
    assert info["fast_dora_layers"] == 0 and info["compiled_kernels"]["decoder_layers"] == 6
    assert info["compiled_kernels"]["dense_attention"] and info["compiled_kernels"]["block_masks"]
    assert len(out["loss"]) == 6 and all(x == x for x in out["loss"]) and out["loss"][-1] < out["loss"][0]


def _long_rows(tokenizer, n: int, tokens: int) -> list[dict]:
    """Chat rows of about ``tokens`` tokens each, so seq 4096 is really used."""
    from trinity_core.fixtures.tiny import CORPUS_PATH

    words = CORPUS_PATH.read_text(encoding="utf-8").split()
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        text = " ".join(rng.choice(words) for _ in range(tokens))
        ids = tokenizer(text)["input_ids"]
        text = tokenizer.decode(ids[: tokens - 200], skip_special_tokens=True)
        cut = len(text) // 10  # a short prompt: the seq 2048 rung still sees supervised tokens
        rows.append({"messages": [{"role": "user", "content": text[:cut]},
                                  {"role": "assistant", "content": text[cut:]}]})
    return rows


CHILD = """
import os
import sys
os.environ.setdefault("UNSLOTH_COMPILE_DISABLE", "1")  # what the backend sets with DoRA, before unsloth
import torch
import unsloth  # noqa: F401  (before transformers)
from trinity_core.errors import GpuMemoryNotReleased
from trinity_core.options import RunOptions
from trinity_core.pipeline import run_job
from trinity_core.spec import JobSpec

spec = JobSpec.model_validate_json(open(sys.argv[1]).read())
total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
torch.cuda.set_per_process_memory_fraction(float(sys.argv[3]) / total_gib)
try:
    run_job(spec, sys.argv[2], options=RunOptions(fast_dora=sys.argv[4] == "1"))
except GpuMemoryNotReleased as e:
    print("continue:", e.message, flush=True)
    sys.exit(3)
"""


def _run_like_the_worker(spec, workdir: Path, cap_gib: float, fast_dora: str) -> dict:
    """run_job in a fresh process, and again (resuming at the next rung) after each
    ``gpu_memory_not_released``, as the worker does with ``worker_max_tasks_per_child=1``."""
    import subprocess
    import sys
    import time

    spec_file = workdir.with_suffix(".spec.json")
    workdir.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(spec.model_dump_json())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    runs, t0 = [], time.monotonic()
    for _ in range(6):  # at most one process per rung of the ladder
        proc = subprocess.run([sys.executable, "-c", CHILD, str(spec_file), str(workdir), str(cap_gib), fast_dora],
                              env=env, capture_output=True, text=True, timeout=1200)
        runs.append(proc.returncode)
        if proc.returncode != 3:
            break
    out = {"processes": runs, "wall_s": round(time.monotonic() - t0, 1)}
    if (workdir / "result.json").exists():
        result = json.loads((workdir / "result.json").read_text())
        return out | {k: result[k] for k in ("attempts", "final_rung", "peak_mem_gib", "train_seconds")} | {
            "loss": [h["loss"] for h in result["loss_history"]]}
    progress = workdir / "progress.json"
    return out | {"error": proc.stderr[-1500:],
                  "attempts_so_far": json.loads(progress.read_text()) if progress.exists() else None}


@needs_unsloth
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TRINITY_BENCH_MODEL"), reason="set TRINITY_BENCH_MODEL to a 12B-shaped model")
def test_ladder_on_real_ooms_under_an_emulated_t4(tmp_path):
    """The seed recipe (12B shape, r 64, DoRA, all 7, batch 1 × accum 4, fp16 → fp32 path, eager
    attention: a T4 has no flex attention at head_dim 256, and the estimate assumes eager) under a
    T4's 15.1 GiB, with a model of L layers: the cap is lowered by what the missing 48 − L layers
    would hold at seq 4096 (estimated), so the memory left for activations is what a T4 leaves.
    Each job runs like the worker runs it: in fresh processes (see ``_run_like_the_worker``).

    In run_job's training loop (Unsloth's chunked loss, no full fp32 logits) even PEFT's own DoRA
    fits the seed's seq 4096 there (6.4 GiB of the 7.7 GiB cap with 4 layers, H100 2026-11-26), so
    A and B ask for seq 8192 on ~8000-token rows, which does not fit:
    A: PEFT's DoRA, seq 8192, pre-flight off → genuine CUDA OOMs, the ladder walks down and finishes.
    B: the same, pre-flight on → at most one failed attempt before the first good step.
    C: fast DoRA, the seed's seq 4096, pre-flight on → the recipe itself fits (issue 10's T4 target)."""
    from transformers import AutoConfig, AutoTokenizer

    from trinity_core.train import memory
    from trinity_core.spec import JobSpec

    model_dir = os.environ["TRINITY_BENCH_MODEL"]
    out_dir = Path(os.environ.get("TRINITY_BENCH_OUT", tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = {}
    for tokens in (4000, 8000):
        data[tokens] = tmp_path / f"long{tokens}.jsonl"
        data[tokens].write_text("".join(json.dumps(r) + "\n" for r in _long_rows(tokenizer, 12, tokens)))
    spec = JobSpec.model_validate({
        "model": {"name_or_path": model_dir, "backend": "unsloth", "compute_dtype": "float16", "attention": "eager"},
        "data": {"path": str(data[4000]), "eval_fraction": 0.1},
        "train": {"max_steps": 2, "save_steps": 100, "warmup_steps": 0},
        "export": {"merge": False, "gguf": False, "evaluate": False}})
    config = AutoConfig.from_pretrained(model_dir)
    full = memory.estimate(dict(config.to_dict(), num_hidden_layers=48), spec, "unsloth", bf16_supported=False)
    here = memory.estimate(config, spec, "unsloth", bf16_supported=False)
    cap = 15.1 - (full.gib - here.gib)
    report = {"layers": config.num_hidden_layers, "cap_gib": round(cap, 3), "est_48_gib": round(full.gib, 3),
              "est_here_gib": round(here.gib, 3), "jobs": {}}
    for job, fast, preflight, seq in (("A_peft_dora_no_preflight", "0", False, 8192),
                                      ("B_peft_dora_preflight", "0", True, 8192),
                                      ("C_fast_dora_preflight", "1", True, 4096)):
        run_spec = spec.model_copy(deep=True)
        run_spec.ladder.preflight = preflight
        run_spec.model.max_seq_length = seq
        run_spec.data.path = str(data[8000 if seq > 4096 else 4000])
        report["jobs"][job] = _run_like_the_worker(run_spec, tmp_path / job, cap, fast)
        (out_dir / "ladder.json").write_text(json.dumps(report, indent=1, default=str))
    a, b, c = (report["jobs"][k] for k in sorted(report["jobs"]))
    assert "attempts" in a, a
    assert [x["outcome"] for x in a["attempts"]][0] == "oom" and a["attempts"][-1]["outcome"] == "ok"
    failed_b = [x for x in b["attempts"] if x["outcome"] == "oom"]
    assert len(failed_b) <= 1 and b["attempts"][-1]["outcome"] == "ok", b
    assert [x["outcome"] for x in c["attempts"]] == ["ok"] and c["final_rung"] == "recipe", c
