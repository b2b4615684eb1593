"""``trinity::nf4_dequantize`` with and without a tail (``[W | s·B]``, fast_dora/lora_in_gemm), compiled, at 12B shapes.

    PYTHONPATH=$PWD/.whl/site:$PWD python bench/dequant_tail.py --out $OUT/dequant_tail.jsonl

Why: in call 34 (docs/BENCHMARKS.md) the tail was written by ``out[:, cols:].copy_(tail)``, which functionalisation
turned into a rewrite of the whole buffer (36 µs for gate_proj), and the kernel divided by a run-time column count
(63 against 50 µs without a tail). Since then the tail is a kernel of its own and the column count a constant of the
launch. One JSON object per line: ``plain`` (W alone), ``tail`` (W and its tail), ``cat`` (W, then ``torch.cat`` with
the tail: what a copy costs), each the median in ms of ``triton.testing.do_bench_cudagraph`` (the calls replayed from
a CUDA graph: call 35 timed them with ``do_bench``, whose figures were the compiled calls' host overhead, longer for
the smaller shapes), with the tail's result checked equal to ``cat``'s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from jsonl_rows import emitter  # noqa: E402

SHAPES = [(15360, 3840), (4096, 3840), (2048, 3840), (3840, 4096)]


def _weight(out_features: int, in_features: int, dtype: torch.dtype):
    import bitsandbytes as bnb

    data = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(out_features)) * 0.02
    return bnb.nn.Params4bit(data.to(dtype), requires_grad=False, blocksize=64, compress_statistics=True,
                             quant_type="nf4").to("cuda")


def main(argv: list[str]) -> None:
    import triton

    from trinity_core.train import nf4_dequant

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--r", type=int, default=64)
    a = ap.parse_args(argv)
    emit = emitter(a.out)

    dtype = torch.bfloat16
    emit({"kind": "setup", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
          "triton": triton.__version__, "r": a.r})
    plain = torch.compile(lambda w: nf4_dequant.dequantize(w, dtype))
    tailed = torch.compile(lambda w, t: nf4_dequant.dequantize(w, dtype, t))
    cat = torch.compile(lambda w, t: torch.cat([nf4_dequant.dequantize(w, dtype), t], dim=1))
    for rows, cols in SHAPES:
        weight = _weight(rows, cols, dtype)
        tail = torch.randn(rows, a.r, device="cuda", dtype=dtype)
        same = torch.equal(tailed(weight, tail), cat(weight, tail))
        for kind, fn in (("plain", lambda: plain(weight)), ("tail", lambda: tailed(weight, tail)),
                         ("cat", lambda: cat(weight, tail))):
            fn()  # compiled before the capture
            torch.cuda.synchronize()
            ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
            emit({"kind": kind, "shape": [rows, cols], "ms": round(ms, 4), "tail_equals_cat": same})


if __name__ == "__main__":
    main(sys.argv[1:])
