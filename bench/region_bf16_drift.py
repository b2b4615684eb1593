"""The compiled layers' losses under bf16 autocast against the eager model's, with and without the adapters'
products inside the base GEMMs (``fast_dora/lora_in_gemm``), step by step (CPU, the tiny 4-bit Gemma-3).

    OMP_NUM_THREADS=2 python bench/region_bf16_drift.py --out bench/results/<date>-cpu-region_bf16_drift.jsonl

Why: at 48 layers on an H200 (call 34, docs/BENCHMARKS.md) the row with ``lora_in_gemm`` ended 3 steps at loss
12.1949 where the rows without it ended at 12.206 ± 0.001. In bf16 the two arrangements round differently (one
rounding of ``x Wᵀ + s·xa·Bᵀ`` instead of the base output rounded, then accumulated into), and AdamW's normalised
steps carry gradient rounding into the weights. This shows the size of that drift beside the eager model's: each
arrangement from the same weights, the same batches, AdamW at lr 1e-3, regions traced by Dynamo and run by
AOTAutograd (``aot_eager``: inductor's kernels are the GPU's business). One JSON object per step: the three losses.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from jsonl_rows import emitter  # noqa: E402
from trinity_core.fixtures.tiny import build_tiny_model  # noqa: E402
from trinity_core.spec import load_spec  # noqa: E402
from trinity_core.train.backends.peft import PeftBackend  # noqa: E402
from trinity_core.train.compiled_layers import compile_decoder_layers  # noqa: E402
from trinity_core.train.fast_dora import lora_in_gemm  # noqa: E402


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    emit = emitter(a.out)
    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(Path(__file__).resolve().parents[1] / "examples" / "tiny.yaml")
        spec.model.name_or_path = str(build_tiny_model(Path(tmp) / "model"))
        eager, _ = PeftBackend().load(spec)
    with torch.no_grad():  # non-zero B, as after some training
        for name, p in eager.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(5))
    models = {"eager": eager, "two_gemms": copy.deepcopy(eager), "lora_in_gemm": copy.deepcopy(eager)}
    warm = torch.randint(7, eager.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    for key in ("two_gemms", "lora_in_gemm"):  # each traced under its own setting (read while Dynamo traces)
        lora_in_gemm.ENABLED = key == "lora_in_gemm"
        compile_decoder_layers(models[key], backend="aot_eager")
        models[key].train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            models[key](input_ids=warm, labels=warm).loss.backward()
        models[key].zero_grad()
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for k, m in models.items()}
    gen = torch.Generator().manual_seed(1)
    for model in models.values():
        model.train()
    for step in range(a.steps):
        ids = torch.randint(7, eager.config.vocab_size, (1, 24), generator=gen)
        losses = {}
        for key, model in models.items():
            lora_in_gemm.ENABLED = key == "lora_in_gemm"  # also where Dynamo traces again
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opts[key].step()
            opts[key].zero_grad()
            losses[key] = round(loss.item(), 5)
        emit({"step": step, **losses})
    lora_in_gemm.ENABLED = True


if __name__ == "__main__":
    main(sys.argv[1:])
