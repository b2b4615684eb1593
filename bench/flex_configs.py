"""Flex attention's Triton block configs at the 12B attention shape: which forward and backward configs are fastest,
against inductor's default for head dim 256, timed alone and checked against an fp32 reference.

    python bench/flex_configs.py [--seq 4096] [--window 1024] [--top 3]

Two phases per kind of layer (sliding, global):

1. Autotune: ``flex_attention`` compiled with ``max_autotune`` over a candidate list of configs (:data:`BWD_CANDIDATES`,
   :data:`FWD_CANDIDATES`, patched in as the CUDA heuristic's lists); inductor precompiles them in parallel and
   benchmarks each kernel alone. Its per-choice timings are captured and printed, best first. They are not the
   op's: the autotuner makes its own inputs, the block mask's tensors included, so a sliding mask's sparsity is not
   what it times (call 53: 7.2 ms for a backward the op runs in 1.3); phase 2 is the measurement.
2. In the op: the default (no options) and the best autotuned backward configs with the best forward, each passed as
   ``kernel_options`` (``fwd_``/``bwd_`` prefixed, the way a model passes them), compiled without autotuning and timed
   forward and forward + backward (median of ``--reps``), with each one's largest error against the fp32 reference
   (relative to the reference's largest value), so a config that is fast and wrong shows.

inductor's default on sm90 for head dim > 128 is backward (64, 64, 64, 64) blocks, 2 stages, 4 warps (the config
``torch/_inductor/template_heuristics/triton.py`` gives); the forward's default is printed by phase 2's first row.
CUDA only."""

from __future__ import annotations

import re
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from attention_kernels import inputs, make_flex, measure, reference_values, shape_arguments  # noqa: E402

BWD_CANDIDATES = [(64, 64, 64, 64, 2, 4),  # inductor's sm90 default for head dim > 128
                  (64, 64, 64, 64, 1, 4), (64, 64, 64, 64, 1, 8), (64, 64, 64, 64, 2, 8), (64, 64, 64, 64, 3, 4),
                  (32, 64, 64, 32, 1, 4), (32, 64, 64, 32, 2, 4), (32, 64, 64, 32, 3, 4), (32, 64, 64, 32, 2, 8),
                  (32, 128, 128, 32, 1, 8), (32, 128, 128, 32, 2, 8), (64, 128, 128, 64, 1, 8),
                  (32, 32, 32, 32, 2, 4), (32, 32, 32, 32, 3, 4), (16, 64, 64, 16, 2, 4), (16, 32, 32, 16, 3, 4)]
"""(BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_stages, num_warps): 16 backward configs around the default, all
satisfying the kernel's static assertions (N1 % M1 == 0, M2 % N2 == 0) and the 128-token sparse blocks. A list of
96 did not finish its parallel precompile in ~6 minutes on 16 cores (call 52, by its stderr's timestamps; 26
out-of-shared-memory reports before it stopped). Call 53 ran this list:
inductor's default was the fastest in the op (docs/BENCHMARKS.md, "calls 52–55")."""

FWD_CANDIDATES = [(64, 32, 3, 4),  # inductor's H100 default for bf16, head dim 256
                  (64, 64, 2, 4), (128, 64, 2, 8), (128, 32, 2, 8), (64, 32, 2, 4), (128, 64, 1, 8)]
"""(BLOCK_M, BLOCK_N, num_stages, num_warps): 6 forward configs."""

_KEYS = ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2", "BLOCK_M", "BLOCK_N", "num_stages", "num_warps")


def _params(description: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"\b(\w+)=(\d+)\b", description) if k in _KEYS}


def patch_candidates() -> list[tuple[str, str, float]]:
    """Make the CUDA heuristic offer the candidate lists under ``max_autotune`` and record every autotune result as
    (op name, choice description, ms)."""
    from torch._inductor import select_algorithm

    try:
        from torch._inductor.template_heuristics import triton as heuristics
    except ImportError:  # torch before the heuristics became a package
        import torch._inductor.template_heuristics as heuristics
    FlexBwDConfig, FlexConfig = heuristics.FlexBwDConfig, heuristics.FlexConfig

    results: list[tuple[str, str, float]] = []
    cls = heuristics.CUDAConfigHeuristic
    cls.get_flex_attn_bwd_configs = lambda self, head_dim, dtype: [FlexBwDConfig(*c) for c in BWD_CANDIDATES]
    cls.get_flex_attn_fwd_configs = lambda self, head_dim, dtype: [FlexConfig(*c) for c in FWD_CANDIDATES]
    original = select_algorithm.AlgorithmSelectorCache.log_results

    def log_results(name, input_nodes, timings, *args, **kwargs):
        for choice, ms in timings.items():
            results.append((name, getattr(choice, "description", str(choice)), float(ms)))
        return original(name, input_nodes, timings, *args, **kwargs)

    select_algorithm.AlgorithmSelectorCache.log_results = staticmethod(log_results)
    return results


def main() -> None:
    p = shape_arguments(__doc__)
    p.add_argument("--top", type=int, default=3, help="best autotuned backward configs timed in phase 2")
    p.add_argument("--kinds", default="sliding,global")
    a = p.parse_args()
    import torch._dynamo
    import torch._inductor.config as inductor_config

    torch._dynamo.config.cache_size_limit = 64
    dev, s, scale = "cuda", a.seq, a.dim ** -0.5
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; batch 1, seq {s}, heads {a.heads}/"
          f"{a.kv_heads}, dim {a.dim}, bf16; window {a.window}; {len(BWD_CANDIDATES)} backward and "
          f"{len(FWD_CANDIDATES)} forward candidates", flush=True)
    q, k, v, dout = inputs(a, dev)
    results = patch_candidates()
    for kind in a.kinds.split(","):
        window = a.window if kind == "sliding" else 0
        keys = sum(min(i + 1, window) if window else i + 1 for i in range(s))
        flop_fwd = 4 * a.heads * a.dim * keys
        # phase 1: autotune
        results.clear()
        torch._dynamo.reset()
        with inductor_config.patch(max_autotune=True):
            x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            make_flex(s, window, dev)(*x, window, scale).backward(dout)
        torch.cuda.synchronize()
        best: dict[str, list[tuple[float, dict]]] = {"fwd": [], "bwd": []}
        for name, description, ms in results:
            params = _params(description)
            which = "bwd" if "backward" in name or "BLOCK_M1" in params else "fwd"
            if ms != float("inf") and params:
                best[which].append((ms, params))
        for which in ("fwd", "bwd"):
            best[which].sort(key=lambda row: row[0])
            print(f"## {kind} autotune {which}: {len(best[which])} configs ran; best 8 (ms alone, params):")
            for ms, params in best[which][:8]:
                print(f"   {ms:8.4f}  {params}")
            if best[which]:
                print(f"   worst {best[which][-1][0]:.4f} ms")
        # phase 2: in the op, through kernel_options
        ref_vals = reference_values(q, k, v, dout, window, scale)
        rows = [("default", {})]
        fwd_opts = ({f"fwd_{k_}": v_ for k_, v_ in best["fwd"][0][1].items()} if best["fwd"] else {})
        if fwd_opts:
            rows.append(("best fwd only", fwd_opts))
        for ms, params in best["bwd"][:a.top]:
            rows.append((f"best fwd + bwd {ms:.3f}", {**fwd_opts, **{f"bwd_{k_}": v_ for k_, v_ in params.items()}}))
        torch._dynamo.reset()
        for label, options in rows:
            try:
                errs, t_fwd, t_all = measure(make_flex(s, window, dev, options), q, k, v, dout, window, scale,
                                             ref_vals, a.reps)
                print(f"{kind:8s} {label:24s} fwd {t_fwd:7.3f} ms  fwd+bwd {t_all:7.3f} ms "
                      f"({3.5 * flop_fwd / t_all / 1e9:6.1f} TFLOP/s)  bwd {t_all - t_fwd:7.3f} ms  "
                      f"rel err out/dq/dk/dv {' '.join(f'{e:.1e}' for e in errs)}  options {options}", flush=True)
            except Exception as e:  # noqa: BLE001 - a config that does not compile is a row, not a crash
                print(f"{kind:8s} {label:24s} failed: {type(e).__name__}: {str(e)[:300]}  options {options}",
                      flush=True)


if __name__ == "__main__":
    main()
