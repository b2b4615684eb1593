"""Fast DoRA's norm refresh per optimizer step: dequantise-and-multiply vs the NF4 Triton kernel.

    PYTHONPATH=$PWD/.whl/site:$PWD python bench/norm_refresh.py --layers 48 --out $OUT/norm_refresh.jsonl
    TRITON_INTERPRET=1 python bench/norm_refresh.py --layers 1 --shape tiny   # CPU: runs end to end
    python bench/norm_refresh.py --sass --sweep                                 # CPU: sm_90 build statistics
    python bench/norm_refresh.py --layers 48 --reuse-layer --profile            # + device time by kernel

Builds ``--layers`` layers of the 7 LoRA projections (12B Gemma-3 shapes: q 4096×3840, k/v
2048×3840, o 3840×4096, gate/up 15360×3840, down 3840×15360), each a random weight quantised by
bitsandbytes to NF4 with double quantisation (blocksize 64, like Unsloth's pre-quantised
checkpoints), with rank-``--r`` A and B, wrapped in fast DoRA's real layer objects. Each path
times ``linear.refresh_after_step`` itself (what the optimizer's post-step hook runs): median of
``--iters`` calls after ``--warmup``, by CUDA events and by host wall clock (each call ends in the
refresh's own host sync). ``old`` is the dequantise-and-mm path (``USE_NF4_KERNEL = False``),
``new`` the kernel with the norm sums in torch (``FUSE_NORMS = False``), ``fused_eager`` the kernel with
its norm epilogue launched from Python each time (``USE_CUDA_GRAPH = False``), ``fused`` the same
replayed as a CUDA graph (the default). Also printed: the kernel alone per projection shape (one launch over all layers,
effective bandwidth of the packed codes), and how far each path's norms are from float64.

One JSON object per line on stdout (and ``--out``): ``kind`` = setup / refresh / kernel / accuracy /
sweep / sass. ``--sweep`` also times a few tile configurations of the kernel alone per shape.
``--sass`` needs no GPU: it compiles the kernel for ``--arch`` and counts the instructions of its
main loop per weight (with ``--sweep``: for the SWEEP configurations too).
``--reuse-layer`` quantises one layer and shares its packed weights across all layers (faster to
build; the output says so).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from jsonl_rows import emitter  # noqa: E402
from trinity_core import nf4  # noqa: E402
from trinity_core.train.fast_dora import linear as qdora  # noqa: E402
from trinity_core.train.fast_dora import nf4_matmul  # noqa: E402

SHAPES = {
    "12b": dict(hidden=3840, q=4096, kv=2048, inter=15360),  # Gemma-3 12B text model
    "tiny": dict(hidden=256, q=256, kv=128, inter=512),  # trinity_core.tiny's Gemma-3
}
SWEEP = [  # (BLOCK_M, num_warps, num_stages); the kernel's fixed choice for 16-bit GEMMs is (128, 4, 3)
    (128, 8, 3), (128, 8, 2), (128, 8, 4), (64, 4, 3), (64, 4, 2), (128, 4, 3), (256, 8, 3), (64, 8, 3),
]


def projections(shape: str) -> list[tuple[str, int, int]]:
    """(name, out_features, in_features) of one decoder layer's 7 LoRA targets."""
    d = SHAPES[shape]
    h, q, kv, inter = d["hidden"], d["q"], d["kv"], d["inter"]
    return [("q", q, h), ("k", kv, h), ("v", kv, h), ("o", h, q), ("gate", inter, h), ("up", inter, h),
            ("down", h, inter)]


def quantized(out_features: int, in_features: int, dtype: torch.dtype, device: torch.device):
    """A Params4bit holding a random weight quantised to NF4 with double quantisation."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    w = (torch.randn(out_features, in_features, device=device) * 0.02).to(dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                       quant_storage=torch.uint8)
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=64, compress_statistics=True,
                             quant_type="nf4", bnb_quantized=True)


def build(args, device: torch.device, dtype: torch.dtype) -> tuple[list, float]:
    """Fast-DoRA layers ``(dora, A, B, scaling, base)`` for every projection of every layer, each
    registered for the refresh by one lazy norm computation; and the seconds spent quantising."""
    from peft.tuners.lora.dora import DoraLinearLayer

    torch.manual_seed(0)
    scaling = 32 / args.r ** 0.5  # rsLoRA, alpha 32
    t0 = time.perf_counter()
    first_layer = [quantized(o, i, dtype, device) for _, o, i in projections(args.shape)]
    quantize_s = time.perf_counter() - t0
    items = []
    for layer in range(args.layers):
        if layer and not args.reuse_layer:
            t0 = time.perf_counter()
            weights = [quantized(o, i, dtype, device) for _, o, i in projections(args.shape)]
            quantize_s += time.perf_counter() - t0
        else:
            weights = first_layer
        for (_, o, i), weight in zip(projections(args.shape), weights):
            base = types.SimpleNamespace(weight=weight, bias=None)
            a = torch.nn.Parameter((torch.randn(args.r, i, device=device) / i ** 0.5).to(args.lora_dtype))
            b = torch.nn.Parameter((torch.randn(o, args.r, device=device) * 0.01).to(args.lora_dtype))
            dora = DoraLinearLayer(fan_in_fan_out=False)
            dora.__class__ = qdora.FastDoraLinearLayer
            dora.prepare(base)
            dora.weight_norm(a, b, scaling, base)
            items.append((dora, a, b, scaling, base))
    return items, quantize_s


def timed(fn, args, device: torch.device) -> tuple[list[float], list[float]]:
    """(device ms, host ms) of each of ``args.iters`` calls of ``fn`` after ``args.warmup``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        fn()
    sync()
    dev, host = [], []
    for _ in range(args.iters):
        sync()
        t0 = time.perf_counter()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        fn()
        if device.type == "cuda":
            end.record()
        sync()
        host.append((time.perf_counter() - t0) * 1e3)
        dev.append(start.elapsed_time(end) if device.type == "cuda" else host[-1])
    return dev, host


def stats(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median_ms": round(statistics.median(ordered), 3), "min_ms": round(ordered[0], 3),
            "max_ms": round(ordered[-1], 3)}


def norms_of(items: list) -> torch.Tensor:
    return torch.cat([item[0]._cached_norm for item in items])


def time_refresh(items: list, args, device: torch.device, emit) -> dict[str, torch.Tensor]:
    """Times both paths of the real refresh; the norms each path left."""
    optimizer = torch.optim.SGD([p for item in items for p in item[1:3]], lr=0.0)
    left = {}
    for path, use_kernel, fuse, graph in (("old", False, False, False), ("new", True, False, False),
                                          ("fused_eager", True, True, False), ("fused", True, True, True)):
        qdora.USE_NF4_KERNEL, qdora.FUSE_NORMS, qdora.USE_CUDA_GRAPH = use_kernel, fuse, graph
        refreshed = qdora.refresh_after_step(optimizer)
        dev, host = timed(lambda: qdora.refresh_after_step(optimizer), args, device)
        left[path] = norms_of(items).clone()
        emit({"kind": "refresh", "path": path, "projections": refreshed, "iters": args.iters,
              "device": stats(dev), "host": stats(host)})
    qdora.USE_NF4_KERNEL = qdora.FUSE_NORMS = qdora.USE_CUDA_GRAPH = True
    return left


def profile_refresh(items: list, args, emit) -> None:
    """Where the fused refresh's device time goes: torch.profiler over ``args.iters`` refreshes, one
    ``profile`` record per kernel or op name with its device time per refresh, largest first."""
    from torch.profiler import ProfilerActivity, profile

    optimizer = torch.optim.SGD([p for item in items for p in item[1:3]], lr=0.0)
    qdora.USE_CUDA_GRAPH = False  # each kernel by name, not one graph launch
    for _ in range(args.warmup):
        qdora.refresh_after_step(optimizer)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.iters):
            qdora.refresh_after_step(optimizer)
        torch.cuda.synchronize()
    qdora.USE_CUDA_GRAPH = True
    rows = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.device_time_total > 0]
    for e in sorted(rows, key=lambda e: -e.device_time_total)[:15]:
        emit({"kind": "profile", "name": e.key[:120], "calls_per_refresh": e.count / args.iters,
              "device_ms_per_refresh": round(e.device_time_total / 1e3 / args.iters, 3)})


def time_kernel(items: list, args, device: torch.device, dtype: torch.dtype, emit, config=None) -> None:
    """The kernel alone: one launch per projection shape over all layers (``config``: a SWEEP entry
    in place of :func:`nf4_matmul.launch_config`)."""
    by_shape: dict[tuple, list] = {}
    for item in items:
        by_shape.setdefault(tuple(item[4].weight.quant_state.shape), []).append(item)
    for (out_features, in_features), group in by_shape.items():
        weights = [item[4].weight for item in group]
        a = torch.stack([item[1].detach() for item in group]).float()
        chosen = nf4_matmul.launch_config
        if config is not None:
            nf4_matmul.launch_config = lambda n, gemm_dtype: dict(zip(("BLOCK_M", "num_warps", "num_stages"), config))
        b = torch.stack([item[2].detach() for item in group])
        w2, s = qdora._stack_constants(group, device)
        try:
            dev, _ = timed(lambda: nf4_matmul.nf4_times_stacked(weights, a, dtype), args, device)
            # the refresh's own launch: W Aᵀ and the norm epilogue (nf4_row_norms_or_none)
            fused, _ = timed(lambda: nf4_matmul.nf4_row_norms_or_none(weights, a, b, w2, s, dtype), args, device)
        finally:
            nf4_matmul.launch_config = chosen
        packed_gb = len(group) * out_features * in_features / 2 / 1e9
        gemm_dtype = torch.float32 if dtype == torch.float32 else torch.float16
        for kind, times in (("kernel", dev), ("kernel_fused", fused)):
            emit({"kind": ("sweep" if config else "kernel") + kind.removeprefix("kernel"),
                  "shape": [out_features, in_features], "layers": len(group),
                  "config": list(config) if config else chosen(out_features, gemm_dtype), **stats(times),
                  "packed_GB_per_s": round(packed_gb / (statistics.median(times) / 1e3), 3)})


def accuracy(items: list, left: dict[str, torch.Tensor], emit) -> None:
    """Each path's norms against float64 for the first layer's projections (max relative error)."""
    offset, errors = 0, {path: 0.0 for path in left}
    for dora, a, b, s, base in items[:7]:
        w = base.weight
        ref = qdora.linear_norm_reference(nf4.dequantize(w.data, w.quant_state, torch.float32), a, b, s)
        n = ref.numel()
        for path, norms in left.items():
            err = ((norms[offset:offset + n].double() - ref).abs() / ref).max().item()
            errors[path] = max(errors[path], err)
        offset += n
    between = {path: ((left[path].double() - left["old"].double()).abs() / left["old"].double()).max().item()
               for path in left if path != "old"}
    emit({"kind": "accuracy", "max_rel_err_vs_float64_layer0": errors, "max_rel_diff_vs_old": between})


def sass_report(args, emit) -> None:
    """Without a GPU: compile the kernel for ``--arch`` (Triton's bundled ptxas) at the 12B widths
    with the fixed launch configuration and the SWEEP ones; print registers, shared memory, spills
    and the instructions of the main loop per weight per thread (from cuobjdump's SASS)."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    kernel = nf4_matmul._kernel(False)
    constexprs = ["K", "BLOCKSIZE", "BLOCKSIZE2", "NESTED", "BLOCK_M", "CHUNK", "R_PAD", "FUSED", "PTX", "PRMT"]
    gemm = "fp32" if args.dtype == "float32" else "fp16"
    chosen = nf4_matmul.launch_config(4096, getattr(torch, "float32" if gemm == "fp32" else "float16"))
    configs = [tuple(chosen[k] for k in ("BLOCK_M", "num_warps", "num_stages"))] + [c for c in SWEEP if args.sweep]
    for in_features in sorted({i for _, _, i in projections(args.shape)}):
        for (block_m, warps, stages), fused in [(c, f) for c in dict.fromkeys(configs) for f in (False, True)]:
            signature = {"table_ptr": "*i64", "a_ptr": f"*{gemm}", "code_ptr": "*i32" if gemm == "fp16" else "*fp32",
                         "out_ptr": "*fp32", "b_ptr": "*bf16", "s_ptr": "*fp32", "size_ptr": "*fp32",
                         "N": "i32", "R": "i32", **{k: "constexpr" for k in constexprs}}
            values = dict(zip(constexprs, (in_features, 64, 256, True, block_m, 64, 64, fused, True, gemm == "fp16")))
            source = ASTSource(kernel, signature, values, {(i,): [["tt.divisibility", 16]] for i in range(7)})
            compiled = triton.compile(source, target=GPUTarget("cuda", args.arch, 32),
                                      options={"num_warps": warps, "num_stages": stages})
            with tempfile.TemporaryDirectory() as tmp:
                Path(tmp, "k.ptx").write_text(compiled.asm["ptx"])
                arch = f"sm_{args.arch}a" if args.arch == 90 else f"sm_{args.arch}"
                ptxas = subprocess.run([str(tools / "ptxas"), f"-arch={arch}", "-v", f"{tmp}/k.ptx", "-o",
                                        f"{tmp}/k.cubin"], capture_output=True, text=True, check=True).stderr
                sass = subprocess.run([str(tools / "cuobjdump"), "-sass", f"{tmp}/k.cubin"], capture_output=True,
                                      text=True, check=True).stdout
            lines = [(int(m.group(1), 16), line) for line in sass.splitlines()
                     for m in [re.match(r"\s*/\*([0-9a-f]{4,})\*/", line)] if m]
            back = [(int(j.group(1), 16), at) for at, line in lines for j in [re.search(r"BRA (0x[0-9a-f]+)", line)]
                    if j and int(j.group(1), 16) < at]
            start, end = max(back, key=lambda edge: edge[1] - edge[0])  # the longest loop: over in_features
            loop = sum(start <= at <= end for at, _ in lines)
            emit({"kind": "sass", "arch": arch, "gemm": gemm, "in_features": in_features, "fused_norms": fused,
                  "config": [block_m, warps, stages], "registers": int(re.search(r"Used (\d+) registers", ptxas)[1]),
                  "spill_bytes": int(re.search(r"(\d+) bytes spill stores", ptxas)[1]),
                  "shared_bytes": compiled.metadata.shared, "loop_instructions": loop,
                  "per_weight_per_thread": round(loop / (block_m * 64 / (warps * 32)), 1)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="12b")
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                        help="the quantised weights' dtype = the refresh's GEMM dtype on CUDA")
    parser.add_argument("--lora-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="A and B (TRL casts them to bf16 for quantised models)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reuse-layer", action="store_true", help="quantise one layer, share it across layers")
    parser.add_argument("--sweep", action="store_true", help="also time a few kernel tile configurations")
    parser.add_argument("--profile", action="store_true", help="also profile the fused refresh's kernels")
    parser.add_argument("--sass", action="store_true",
                        help="no GPU needed: compile the kernel for --arch and count its main loop's instructions")
    parser.add_argument("--arch", type=int, default=90, help="compute capability for --sass (90: H100/H200)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.lora_dtype = getattr(torch, args.lora_dtype)
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        nf4.read_rows_flat_on_cpu()
    emit = emitter(args.out, "w")

    if args.sass:
        sass_report(args, emit)
        return 0
    t0 = time.perf_counter()
    items, quantize_s = build(args, device, dtype)
    import triton

    emit({"kind": "setup", "card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
          "torch": torch.__version__, "triton": triton.__version__, "interpret": nf4_matmul.interpreting(),
          "shape": args.shape, "layers": args.layers, "projections": len(items), "r": args.r,
          "dtype": args.dtype, "lora_dtype": str(args.lora_dtype), "reused_layer": args.reuse_layer,
          "quantize_s": round(quantize_s, 1), "build_s": round(time.perf_counter() - t0, 1),
          "kernel_takes_them": nf4_matmul.why_not([items[0][4].weight], device) or "yes"})
    left = time_refresh(items, args, device, emit)
    accuracy(items, left, emit)
    if args.profile and device.type == "cuda":
        profile_refresh(items, args, emit)
    time_kernel(items, args, device, dtype, emit)
    if args.sweep:
        for config in SWEEP:
            time_kernel(items, args, device, dtype, emit, config)
    emit({"kind": "done", "total_s": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
