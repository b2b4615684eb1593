"""cuDNN's banded attention (the sliding layers' default kernel on Hopper) by execution plan.

``trinity_core.train.dense_attention`` runs a sliding layer through cudnn-frontend's torch op
(``torch.ops.cudnn.sdpa_fwd`` and its autograd), which builds each graph with cuDNN's heuristics mode A (fallback
after it) and runs the first plan that builds. In call 61 (H200) that op ran the global layer's causal attention at
1.663 ms forward + backward against 1.344 ms through torch's SDPA cuDNN backend. This script asks whether another
plan, or the op's per-call Python, is the difference: it builds the forward and backward graphs of one sliding layer
at the 12B shape (16 query / 8 key-value heads of 256, seq 4096, window 1024, bf16; the band as the op builds it)
with heuristics modes A, B and fallback, builds every plan, and times each alone (median of ``--reps``), beside the
op's own forward and forward + backward per call. ``--window 0``: the causal (global) graph instead.

    python bench/cudnn_band_plans.py [--window 1024] [--reps 20]   # a CUDA machine with nvidia-cudnn-frontend

Prints one line a plan: its index, name, workspace, milliseconds, and whether its output matches the op's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_kernels import shape_arguments, timed  # noqa: E402  (the 12B shape; the CUDA-event median)


def new_graph(cudnn, handle):
    return cudnn.pygraph(handle=handle, io_data_type=cudnn.data_type.BFLOAT16,
                         intermediate_data_type=cudnn.data_type.FLOAT, compute_data_type=cudnn.data_type.FLOAT)


def band(cudnn, window: int) -> dict:
    """The op's band arguments (``cudnn.sdpa.fwd.torch_op._build_graph``: causal, left bound = window)."""
    return dict(diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT, diagonal_band_right_bound=0,
                diagonal_band_left_bound=window if window > 0 else None)


def forward_graph(cudnn, handle, q, k, v, o, stats, scale, window):
    g = new_graph(cudnn, handle)
    t = {name: g.tensor(name=name, dim=list(x.shape), stride=list(x.stride()), data_type=cudnn.data_type.BFLOAT16,
                        uid=uid) for name, x, uid in (("q", q, 1), ("k", k, 2), ("v", v, 3))}
    o_t, stats_t = g.sdpa(name="sdpa_fwd", q=t["q"], k=t["k"], v=t["v"], generate_stats=True, attn_scale=scale,
                          **band(cudnn, window))
    o_t.set_uid(100).set_output(True).set_dim(list(o.shape)).set_stride(list(o.stride()))
    o_t.set_data_type(cudnn.data_type.BFLOAT16)
    stats_t.set_uid(101).set_output(True).set_dim(list(stats.shape)).set_stride(list(stats.stride()))
    stats_t.set_data_type(cudnn.data_type.FLOAT)
    return g, [1, 2, 3, 100, 101]


def backward_graph(cudnn, handle, q, k, v, o, do, stats, dq, dk, dv, scale, window):
    g = new_graph(cudnn, handle)
    t = {}
    for name, x, uid, dtype in (("q", q, 1, None), ("k", k, 2, None), ("v", v, 3, None), ("o", o, 100, None),
                                ("dO", do, 200, None), ("stats", stats, 101, cudnn.data_type.FLOAT)):
        t[name] = g.tensor(name=name, dim=list(x.shape), stride=list(x.stride()),
                           data_type=dtype or cudnn.data_type.BFLOAT16, uid=uid)
    grads = g.sdpa_backward(name="sdpa_bwd", q=t["q"], k=t["k"], v=t["v"], o=t["o"], dO=t["dO"], stats=t["stats"],
                            attn_scale=scale, use_deterministic_algorithm=False, **band(cudnn, window))
    for grad, x, uid in zip(grads, (dq, dk, dv), (201, 202, 203)):
        grad.set_uid(uid).set_output(True).set_dim(list(x.shape)).set_stride(list(x.stride()))
        grad.set_data_type(cudnn.data_type.BFLOAT16)
    return g, [1, 2, 3, 100, 200, 101, 201, 202, 203]


def sweep(cudnn, handle, label, g, uids, buffers, outputs, expected, reps):
    """Plan the graph with modes A, B and fallback, build every plan, time each; one line a plan."""
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
    g.check_support()
    try:  # every plan at once; a plan that raises (not a decline) stops the walk: then each plan on its own below
        g.build_plans(cudnn.build_plan_policy.ALL)
    except Exception as error:
        print(f"# {label}: build_plans(ALL) raised {type(error).__name__}: {str(error)[:150]}; building plan by plan")
    count = g.get_execution_plan_count()
    print(f"# {label}: {count} plans (A, B, fallback)")
    for index in range(count):
        try:
            name = g.get_plan_name_at_index(index)
            g.build_plan_at_index(index)
            workspace = torch.empty(max(g.get_workspace_size(), 1), dtype=torch.uint8, device="cuda")
            for out in outputs:
                out.zero_()
            g.execute(buffers, workspace, handle=handle, tensor_uids=uids)
            torch.cuda.synchronize()
            same = all(bool(torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2))
                       for a, b in zip(outputs, expected))
            run = lambda: g.execute(buffers, workspace, handle=handle, tensor_uids=uids)  # noqa: E731
            run()
            ms = timed(run, reps)
            print(f"{label:8} plan {index:2d} {name[:60]:60} workspace {workspace.numel() / 2**20:8.1f} MiB "
                  f"{ms:8.3f} ms  same as the op: {same}")
        except Exception as error:  # a plan that declines this graph or fails to build: said, not hidden
            print(f"{label:8} plan {index:2d} not run: {type(error).__name__}: {str(error)[:150]}")


def main() -> None:
    p = shape_arguments(__doc__)  # --seq, --window (0 here: causal), --heads, --kv-heads, --dim, --reps
    a = p.parse_args()

    import cudnn
    import cudnn.sdpa.fwd.torch_op  # noqa: F401  (torch.ops.cudnn.sdpa_fwd)

    dev, scale, window = "cuda", a.dim ** -0.5, a.window
    backend = getattr(cudnn, "backend_version", lambda: "?")()
    versions = f"cuDNN {backend}, cudnn-frontend {getattr(cudnn, '__version__', '?')}"
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {versions}; batch 1, seq {a.seq}, heads "
          f"{a.heads}/{a.kv_heads}, dim {a.dim}, bf16, window {window or 'none (causal)'}")
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, a.heads, a.seq, a.dim, device=dev, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, a.kv_heads, a.seq, a.dim, device=dev, dtype=torch.bfloat16, generator=g) for _ in "kv")
    do = torch.randn(1, a.heads, a.seq, a.dim, device=dev, dtype=torch.bfloat16, generator=g)
    op = torch.ops.cudnn.sdpa_fwd
    left = window if window > 0 else -1

    # the op: its outputs (the reference each plan is checked against) and its times per call
    o_ref, lse_ref = op(q, k, v, scale, is_causal=True, window_left=left, return_lse=True)
    x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    op(*x, scale, is_causal=True, window_left=left, return_lse=True)[0].backward(do)
    grads_ref = [t.grad.detach().clone() for t in x]

    def op_forward():
        op(q, k, v, scale, is_causal=True, window_left=left, return_lse=True)

    def op_forward_backward():
        y = [t.detach().requires_grad_() for t in (q, k, v)]
        op(*y, scale, is_causal=True, window_left=left, return_lse=True)[0].backward(do)
    op_forward(), op_forward_backward()  # warm: the op builds and caches its graphs on a first call
    print(f"op       forward {timed(op_forward, a.reps):.3f} ms, forward + backward "
          f"{timed(op_forward_backward, a.reps):.3f} ms (torch.ops.cudnn.sdpa_fwd and its autograd, per call)")

    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    o, stats = torch.empty_like(q), torch.empty(1, a.heads, a.seq, 1, device=dev, dtype=torch.float32)
    graph, uids = forward_graph(cudnn, handle, q, k, v, o, stats, scale, window)
    sweep(cudnn, handle, "forward", graph, uids, [q, k, v, o, stats], [o], [o_ref], a.reps)

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    stats_ref = lse_ref.reshape(1, a.heads, a.seq, 1).contiguous()
    graph, uids = backward_graph(cudnn, handle, q, k, v, o_ref, do, stats_ref, dq, dk, dv, scale, window)
    sweep(cudnn, handle, "backward", graph, uids, [q, k, v, o_ref, do, stats_ref, dq, dk, dv], [dq, dk, dv], grads_ref,
          a.reps)


if __name__ == "__main__":
    main()
