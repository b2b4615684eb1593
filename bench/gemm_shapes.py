"""The GEMMs of one 12B decoder layer at seq 4096, alone, by cuBLAS: how far the layers' 657 TFLOP/s is from what
the card does on the same shapes.

Call 49's profile (docs/BENCHMARKS.md, "Goal 1, 2026-11-30 (calls 52-55)") put a layer pass's GEMMs at 8.65 ms,
657 TFLOP/s; 1.1x the peer needs ~0.5 ms a layer less (calls 56-59). This times each GEMM a LoRA job's layer runs,
in bf16 at M = tokens, with the layout the layers use (``F.linear``: x (M, in) times W (out, in) transposed):

- ``fwd``: x Wᵀ for the 7 frozen projections; with ``--r`` the adapter inside the GEMM as the LoRA layers run it
  for gate, up and o_proj (``fast_dora/lora_in_gemm``: K = in + r) and, beside it, K padded to a multiple of 128;
- ``dx``: dY W for each (the input gradient; the frozen W has none of its own);
- the adapters' own small GEMMs (x Aᵀ, its gradients) as one total.

    python bench/gemm_shapes.py [--tokens 4096] [--r 64] [--reps 30]

Prints the median milliseconds and TFLOP/s of each, and the layer's totals (forward, backward) at those rates.
CUDA only; no model needed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_kernels import timed  # noqa: E402  (the same CUDA-event median)

HIDDEN, INTER, Q_OUT, KV_OUT = 3840, 15360, 16 * 256, 8 * 256
PROJECTIONS = {"q_proj": (HIDDEN, Q_OUT), "k_proj": (HIDDEN, KV_OUT), "v_proj": (HIDDEN, KV_OUT),
               "o_proj": (Q_OUT, HIDDEN), "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER),
               "down_proj": (INTER, HIDDEN)}
IN_GEMM = ("gate_proj", "up_proj", "o_proj")  # lora_in_gemm.LORA_PROJECTIONS


def gemm_row(name: str, m: int, k: int, n: int, reps: int) -> dict:
    """(m, k) times (n, k)ᵀ in bf16: its median ms and TFLOP/s."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    fn = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
    for _ in range(3):
        fn()
    ms = timed(fn, reps)
    return {"name": name, "m": m, "k": k, "n": n, "ms": round(ms, 4), "tflops": round(2 * m * k * n / ms / 1e9, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gemm_shapes.py: needs a CUDA GPU")
    m, r = a.tokens, a.r
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, tokens {m}, r {r}")
    fwd = dx = 0.0
    for proj, (k_in, n_out) in PROJECTIONS.items():
        rows = [gemm_row(f"{proj} fwd", m, k_in, n_out, a.reps), gemm_row(f"{proj} dx", m, n_out, k_in, a.reps)]
        if proj in IN_GEMM:
            padded = -(-(k_in + r) // 128) * 128
            rows += [gemm_row(f"{proj} fwd [x|Ax]", m, k_in + r, n_out, a.reps),
                     gemm_row(f"{proj} fwd [x|Ax] padded", m, padded, n_out, a.reps),
                     gemm_row(f"{proj} dx [dx|dAx]", m, n_out, k_in + r, a.reps)]
        for row in rows:
            print(f"{row['name']:28} m {row['m']:5} k {row['k']:5} n {row['n']:5}  {row['ms']:8.4f} ms "
                  f"{row['tflops']:7.1f} TFLOP/s")
        fwd += rows[0]["ms"]
        dx += rows[1]["ms"]
    small = [gemm_row("x Aᵀ", m, k, r, a.reps)["ms"] + gemm_row("(x A) Bᵀ", m, r, n, a.reps)["ms"]
             for k, n in PROJECTIONS.values()]
    base_flop = 2 * m * sum(k * n for k, n in PROJECTIONS.values())
    print(f"frozen projections: forward {fwd:.3f} ms, input gradient {dx:.3f} ms: "
          f"{2 * base_flop / (fwd + dx) / 1e9:.1f} TFLOP/s over both")
    print(f"adapters' forward GEMMs (x Aᵀ, then B): {sum(small):.3f} ms")


if __name__ == "__main__":
    main()
