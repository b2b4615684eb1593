"""The gated MLP activation's backward kernel (``trinity_core/train/fast_dora/mlp.py``) by tile, beside the peers.

    PYTHONPATH=$PWD/.whl/site:$PWD python bench/gated_act_sweep.py --out $OUT/gated_act_sweep.jsonl
    TRITON_INTERPRET=1 python bench/gated_act_sweep.py --tokens 64 --cols 192 --quick   # CPU: runs end to end

Why: call 25's profile (docs/BENCHMARKS.md) put fast DoRA's backward kernel at 64.5 ms an optimizer step on the
12B shape (192 launches at 4096 × 15360, ~0.34 ms each), against 32.8 ms for the fused kernel that inductor makes
of compiled LoRA's activation backward. Both move five (tokens × N) bf16 tensors (dh, e and u in; de and du out);
the DoRA kernel also sums two products over tokens for the gain gradients.

Rows, one JSON object per line (``kind``):
- ``peer``: inductor's kernel for LoRA's ``gelu_tanh(e) ⊙ u`` backward (``torch.compile`` of the same formula:
  what the compiled-LoRA rows run), the bandwidth to beat;
- ``before``: the kernel as it was until this script (a 1-D accumulator reduced across the program's threads at
  every step of 32 rows; ROWS 256, BLOCK_T 32, BLOCK_N 128, 4 warps), kept here as a copy;
- ``tiles``: today's kernel (the sums kept per tile row until the loop ends) for each tile in ``--tiles`` or the
  built-in list, de and du checked equal to the ``before`` kernel's to the bit, the gain sums against float64;
- ``best``: the fastest ``tiles`` row that passed, and ``best_tiles`` as ``ROWS,BLOCK_T,BLOCK_N,WARPS``, the form
  ``bench/gpu_bench.py --gated-tiles`` takes.

With ``--lora R`` the kernel also adds down_proj's adapter part ``d_xa·A`` to h's gradient (``mlp.DOWN_TILES``,
``GatedActDownInGraph``): ``peer`` is then inductor's kernel of LoRA's backward with that sum (cuBLAS's
``d_xa·A``, the sum fused into the activation's backward, as compiled LoRA runs it), ``two_nodes`` fast DoRA's
kernel without the product after the same GEMM and sum, and each ``tiles`` row (``ROWS,BLOCK_T,BLOCK_N,WARPS,DOT_ACC``;
``DOT_ACC`` 1: h's gradient is the ``tl.dot``'s accumulator) is checked against float64 (de, du, the gain sums)
instead of to the bit; ``best_tiles`` is the form ``bench/gpu_bench.py --down-tiles`` takes.

Times: the median of CUDA-event timings (``triton.testing.do_bench``) on a GPU, of wall-clock ones on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from jsonl_rows import emitter  # noqa: E402

from trinity_core.train.fast_dora import mlp  # noqa: E402

triton, tl = mlp.triton, mlp.tl

TILES = [(r, bt, bn, w) for r in (32, 64, 128, 256) for bt, bn in ((8, 256), (16, 128), (32, 128), (16, 256))
         for w in (4, 8) if bt <= r]
"""(rows, block_t, block_n, warps) timed by default: 32 tiles."""

LORA_TILES = [(r, bt, bn, w, acc) for r in (64, 128, 256) for bt, bn in ((16, 128), (32, 128), (16, 256), (32, 64),
                                                                         (64, 64))
              for w in (4, 8) for acc in (0, 1) if bt <= r]
"""(rows, block_t, block_n, warps, dot_acc) timed by default with ``--lora``: 60 tiles (tl.dot takes ≥ 16 rows)."""

if triton is not None:

    @triton.jit
    def _before_kernel(dh_ptr, e_ptr, u_ptr, ge_ptr, gu_ptr, de_ptr, du_ptr, pe_ptr, pu_ptr, T, N,
                       GELU: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        """mlp._backward_kernel until 2026-11-29 (this session): the sums reduced across threads at each step."""
        pid_t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        ge = tl.load(ge_ptr + cols, mask=cmask, other=0.0)[None, :]
        gu = tl.load(gu_ptr + cols, mask=cmask, other=0.0)[None, :]
        acc_e = tl.full((BLOCK_N,), 0.0, tl.float32)
        acc_u = tl.full((BLOCK_N,), 0.0, tl.float32)
        for t in range(0, ROWS, BLOCK_T):
            rows = (pid_t * ROWS + t + tl.arange(0, BLOCK_T)).to(tl.int64)
            mask = (rows[:, None] < T) & cmask[None, :]
            offs = rows[:, None] * N + cols[None, :]
            dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            val, der = mlp._act(e * ge, GELU)
            da = dh * u * gu * der
            db = dh * val
            tl.store(de_ptr + offs, (da * ge).to(de_ptr.dtype.element_ty), mask=mask)
            tl.store(du_ptr + offs, (db * gu).to(du_ptr.dtype.element_ty), mask=mask)
            acc_e += tl.sum(da * e, axis=0)
            acc_u += tl.sum(db * u, axis=0)
        tl.store(pe_ptr + pid_t * N + cols, acc_e, mask=cmask)
        tl.store(pu_ptr + pid_t * N + cols, acc_u, mask=cmask)


def _before(dh, e, u, g_e, g_u, gelu):
    t, n = e.shape
    blocks = -(-t // 256)
    de, du = torch.empty_like(e), torch.empty_like(u)
    pe, pu = (torch.empty((blocks, n), device=e.device, dtype=torch.float32) for _ in range(2))
    _before_kernel[(blocks, -(-n // 128))](dh, e, u, g_e, g_u, de, du, pe, pu, t, n, GELU=gelu, ROWS=256,
                                           BLOCK_T=32, BLOCK_N=128)
    return de, du, pe.sum(0), pu.sum(0)


def _tiled(dh, e, u, g_e, g_u, gelu):
    de, du = torch.empty_like(e), torch.empty_like(u)
    return (de, du, *mlp._launch_backward(dh, e, u, g_e, g_u, de, du, gelu))


def _tiled_lora(dh, e, u, g_e, g_u, gelu, d_xa, lora_a):
    de, du = torch.empty_like(e), torch.empty_like(u)
    return (de, du, *mlp._launch_backward(dh, e, u, g_e, g_u, de, du, gelu, d_xa=d_xa, lora_a=lora_a))


def _two_nodes(dh, e, u, g_e, g_u, gelu, d_xa, lora_a):
    """What the two-node arrangement runs: cuBLAS's ``d_xa·A``, the sum, then the kernel without the product."""
    return _tiled(dh + d_xa.mm(lora_a), e, u, g_e, g_u, gelu)


def _peer_lora_formula(dh, e, u, d_xa, lora_a):
    """Compiled LoRA's down_proj input gradient and activation backward: the GEMM, the sum fused into the kernel."""
    return _peer_formula(dh + d_xa.mm(lora_a), e, u)


def _peer_formula(dh, e, u):
    """LoRA's gelu_tanh(e) ⊙ u backward, as autograd writes it (inductor fuses it into one kernel)."""
    e32, u32, dh32 = e.float(), u.float(), dh.float()
    val, der = mlp._act_torch(e32, True)
    return (dh32 * u32 * der).to(e.dtype), (dh32 * val).to(u.dtype)


def _time_ms(fn, quick: bool) -> float:
    if torch.cuda.is_available():
        return float(triton.testing.do_bench(fn, warmup=25, rep=100 if quick else 400, return_mode="median"))
    times = []
    for _ in range(2 if quick else 5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=15360, help="the MLP's intermediate size (Gemma-3-12B: 15360)")
    ap.add_argument("--silu", action="store_true", help="SiLU instead of tanh-GELU (Gemma)")
    ap.add_argument("--tiles", nargs="*", default=None, help="ROWS,BLOCK_T,BLOCK_N,WARPS ... (default: TILES)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and tiles (a smoke run)")
    ap.add_argument("--lora", type=int, default=0, metavar="R", help="with down_proj's adapter part d_xa·A, rank R")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gelu = not a.silu
    gen = torch.Generator(device=device).manual_seed(0)
    e, u, dh = (torch.randn(a.tokens, a.cols, device=device, generator=gen).to(dtype) for _ in range(3))
    g_e, g_u = (torch.rand(a.cols, device=device, generator=gen) + 0.5 for _ in range(2))
    moved = 5 * e.numel() * e.element_size()  # dh, e, u read; de, du written
    emit = emitter(a.out)

    emit({"kind": "setup", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
          "tokens": a.tokens, "cols": a.cols, "dtype": str(dtype), "gelu": gelu, "bytes_moved": moved,
          "lora_r": a.lora, "torch": torch.__version__, "triton": triton.__version__})

    def row(kind: str, ms: float, **extra) -> dict:
        return {"kind": kind, "ms": round(ms, 4), "gb_per_s": round(moved / ms / 1e6, 1), **extra}

    if a.lora:
        d_xa = torch.randn(a.tokens, a.lora, device=device, generator=gen).to(dtype)
        lora_a = (torch.randn(a.lora, a.cols, device=device, generator=gen) / a.cols ** 0.5).to(dtype)
        dh_all = dh.double() + d_xa.double() @ lora_a.double()
        ref = mlp._backward_torch(dh_all, e.double(), u.double(), g_e.double(), g_u.double(), gelu)
        sweep_lora(a, emit, row, (dh, e, u, g_e, g_u, gelu, d_xa, lora_a), ref, device)
        return
    ref = mlp._backward_torch(dh.double(), e.double(), u.double(), g_e.double(), g_u.double(), gelu)
    if device == "cuda" and gelu:
        peer = torch.compile(_peer_formula, fullgraph=True)
        emit(row("peer", _time_ms(lambda: peer(dh, e, u), a.quick), what="inductor: gelu_tanh(e)*u backward"))
    before = _before(dh, e, u, g_e, g_u, gelu)
    emit(row("before", _time_ms(lambda: _before(dh, e, u, g_e, g_u, gelu), a.quick),
             tiles=[256, 32, 128, 4], d_ge_rel=_rel(before[2], ref[2]), d_gu_rel=_rel(before[3], ref[3])))
    tiles = [tuple(int(x) for x in t.split(",")) for t in a.tiles] if a.tiles else TILES
    if a.quick and not a.tiles:
        tiles = [(256, 32, 128, 4), (32, 16, 128, 4), (64, 16, 256, 8)]
    def check(t):
        got = _tiled(dh, e, u, g_e, g_u, gelu)
        same = torch.equal(got[0], before[0]) and torch.equal(got[1], before[1])
        errors = {"d_ge_rel": _rel(got[2], ref[2]), "d_gu_rel": _rel(got[3], ref[3])}
        return same and max(errors.values()) < 1e-4, {"de_du_as_before": same, **errors}

    _sweep("BACKWARD_TILES", tiles, check, lambda: _tiled(dh, e, u, g_e, g_u, gelu), a.quick, emit, row)


def _sweep(attr: str, tiles: list, check, launch, quick: bool, emit, row) -> None:
    """Each tile set as ``mlp.<attr>`` in turn: checked (``check(t)`` → (ok, fields)) and timed, a ``tiles`` row
    each, then the fastest that passed as ``best``; ``mlp.<attr>`` restored."""
    own, best = getattr(mlp, attr), None
    try:
        for t in tiles:
            setattr(mlp, attr, mlp.BackwardTiles(*t))
            ok, fields = check(t)
            r = row("tiles", _time_ms(launch, quick), tiles=list(t), ok=ok, **fields)
            emit(r)
            if ok and (best is None or r["ms"] < best["ms"]):
                best = r
    finally:
        setattr(mlp, attr, own)
    if best is not None:
        emit({**best, "kind": "best", "best_tiles": ",".join(str(x) for x in best["tiles"])})


def sweep_lora(a, emit, row, args, ref, device) -> None:
    """``--lora``: the kernel with ``d_xa·A`` by tile, beside compiled LoRA's kernel and the two-node arrangement.
    A tile passes when de and du are within 2 bf16 ulps of float64 (relative to their largest value: the product
    is summed in fp32 in another order than cuBLAS's) and the gain sums within 1e-4."""
    dh, e, u, g_e, g_u, gelu, d_xa, lora_a = args
    if device == "cuda" and gelu:
        peer = torch.compile(_peer_lora_formula, fullgraph=True)
        emit(row("peer", _time_ms(lambda: peer(dh, e, u, d_xa, lora_a), a.quick),
                 what="inductor: d_xa·A (cuBLAS), then gelu_tanh(e)*u backward with the sum fused"))
    emit(row("two_nodes", _time_ms(lambda: _two_nodes(*args), a.quick), tiles=list(dataclasses.astuple(
        mlp.BACKWARD_TILES)), what="d_xa·A, the sum, the kernel without the product"))
    tiles = [tuple(int(x) for x in t.split(",")) for t in a.tiles] if a.tiles else LORA_TILES
    if a.quick and not a.tiles:
        tiles = [(256, 16, 128, 4, 0), (64, 32, 64, 4, 1)]
    tol = 2 * 2.0 ** -8 if dh.dtype == torch.bfloat16 else 1e-5

    def check(t):
        got = _tiled_lora(*args)
        errors = {"de_rel": _rel(got[0], ref[0]), "du_rel": _rel(got[1], ref[1]),
                  "d_ge_rel": _rel(got[2], ref[2]), "d_gu_rel": _rel(got[3], ref[3])}
        ok = max(errors["de_rel"], errors["du_rel"]) < tol and max(errors["d_ge_rel"], errors["d_gu_rel"]) < 1e-4
        return ok, errors

    _sweep("DOWN_TILES", tiles, check, lambda: _tiled_lora(*args), a.quick, emit, row)


if __name__ == "__main__":
    main(sys.argv[1:])
