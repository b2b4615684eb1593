"""Where one decoder layer's time goes: a kept torch.profiler table of one optimizer step (bench/gpu_bench.py,
TRINITY_BENCH_PROFILE) split by ``profile_diff.group`` and divided per layer pass (layers × micro-batches).

    python bench/layer_split.py bench/results/2026-11-30-h200-dense-49-prof.tar.gz \\
        prof-flex_layers_lora_acc4-L4.txt --layers 4 --micro-batches 4 --tokens 4096

The GEMMs with fp32 output (cuBLAS's ``nvjet_…_tss_…`` kernels: bf16 in, fp32 out) are counted apart as the loss
head's: the decoder layers' projections write bf16 (``…_tst_…``), the logits for the fp32 cross entropy do not. That
attribution is by the kernel's output type, an inference from the names, stated so in the output. The layers' GEMM
rate counts the frozen projections' forward, recomputed forward (gradient checkpointing) and input gradient (6 FLOPs a
weight a token) and the adapters' forward, recomputed forward and both gradients (8 FLOPs a weight a token), at the
12B shape by default (``--linear``, ``--lora``: weights a layer)."""

from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_diff import device_rows, group  # noqa: E402

LINEAR_12B = 224_133_120  # one 12B decoder layer's 7 projections (tests/core/test_memory.py)
LORA_12B_R64 = 64 * 85_248  # their r-64 adapters, A and B


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("archive", type=Path)
    p.add_argument("table")
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--micro-batches", type=int, required=True)
    p.add_argument("--tokens", type=int, required=True, help="tokens a micro-batch")
    p.add_argument("--linear", type=int, default=LINEAR_12B)
    p.add_argument("--lora", type=int, default=LORA_12B_R64)
    a = p.parse_args(argv)
    with tarfile.open(a.archive) as tar:
        rows = device_rows(tar.extractfile(a.table).read().decode())
    totals: dict[str, float] = {}
    for name, (ms, _) in rows.items():
        g = "GEMM, fp32 out (the loss head's)" if name.startswith("nvjet") and "_tss_" in name else group(name)
        totals[g] = totals.get(g, 0.0) + ms
    passes = a.layers * a.micro_batches
    print(f"# {a.archive.name} {a.table}: {a.layers} layers x {a.micro_batches} micro-batches = {passes} layer passes")
    print(f"{'group':36} {'step ms':>9} {'ms a layer pass':>16}")
    for g, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        share = "" if g.startswith("GEMM, fp32") else f"{ms / passes:16.3f}"
        print(f"{g:36} {ms:9.1f} {share}")
    print(f"{'all device rows':36} {sum(totals.values()):9.1f}")
    flop = (6 * a.linear + 8 * a.lora) * a.tokens
    gemm_ms = totals.get("GEMM", 0.0) / passes
    print(f"layer GEMMs: {gemm_ms:.3f} ms a pass for {flop / 1e12:.2f} TFLOP = {flop / gemm_ms / 1e9:.0f} TFLOP/s "
          "(bf16-output GEMMs only; the fp32-output ones attributed to the loss head by their output type)")


if __name__ == "__main__":
    main(sys.argv[1:])
