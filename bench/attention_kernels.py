"""Gemma-3 attention at the 12B shape, forward + backward, by kernel: flex attention as transformers runs it
(compiled, a block mask, ``IS_DIVISIBLE``), torch's built-in FlashAttention-2 (``aten._flash_attention_forward``
with a left window for the sliding layers), SDPA's cuDNN and flash backends where they apply (causal only), and
cuDNN's kernel with a band through cudnn-frontend's op where that package is importable (``bench/gpu_cudnn_fe.sh``).

    python bench/attention_kernels.py [--seq 4096] [--window 1024] [--reps 20]

Prints, per kind (sliding, global) and kernel: the median milliseconds of forward and of forward + backward,
the TFLOP/s that makes (the FLOPs of the unmasked part only), and each kernel's largest error against an fp32
reference (output and the three gradients, relative to the reference's largest value). CUDA only."""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F


def reference(q, k, v, window, scale):
    """fp32 attention with an explicit mask: causal, and within ``window`` keys of the query when given
    (transformers' sliding-window overlay: key > query - window)."""
    s = q.shape[2]
    i = torch.arange(s, device=q.device)
    mask = i[None, :] <= i[:, None]
    if window:
        mask &= i[None, :] > i[:, None] - window
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale,
                                          enable_gqa=True)


def flash(q, k, v, window, scale):
    """torch's FlashAttention-2 on (batch, heads, seq, dim) tensors; its layout is (batch, seq, heads, dim)."""
    s = q.shape[2]
    out = torch.ops.aten._flash_attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, s, s, 0.0, True, False, scale=scale,
        window_size_left=window - 1 if window else -1, window_size_right=0)[0]
    return out.transpose(1, 2)


def make_flex(s, window, device, options=None):
    """Flex attention compiled as transformers runs it (a block mask, ``IS_DIVISIBLE``), ``options`` added to its
    ``kernel_options`` (``bench/flex_configs.py``: block configs)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    def sliding(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx > q_idx - window)

    block_mask = create_block_mask(sliding if window else causal, None, None, s, s, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, _window, scale):
        return compiled(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True,
                        kernel_options={"IS_DIVISIBLE": True, **(options or {})})
    return run


def sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, window, scale):
        if window:
            raise NotImplementedError("no sliding window")
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return run


def cudnn_frontend(q, k, v, window, scale):
    """cuDNN's fused attention through cudnn-frontend's op (``nvidia-cudnn-frontend``), causal, with a diagonal band
    of ``window`` keys on sliding layers: what ``dense_attention.SLIDING_KERNEL = "cudnn"`` runs."""
    out, _ = torch.ops.cudnn.sdpa_fwd(q, k, v, scale, is_causal=True, window_left=window or -1, return_lse=True)
    return out


def timed(fn, reps):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def reference_values(q, k, v, dout, window, scale):
    """The fp32 reference's output and q, k, v gradients."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = reference(*leaves, window, scale)
    ref.backward(dout.float())
    return [ref.detach()] + [t.grad for t in leaves]


def measure(fn, q, k, v, dout, window, scale, ref_vals, reps):
    """``fn``'s largest errors against ``ref_vals`` (output, dq, dk, dv; relative to the reference's largest value)
    and its median forward and forward + backward milliseconds."""
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*xs, window, scale)
    out.backward(dout)
    errs = [(got.float() - want).abs().max().item() / want.abs().max().item()
            for got, want in zip([out.detach()] + [t.grad for t in xs], ref_vals)]

    def fwd():
        with torch.no_grad():
            fn(q, k, v, window, scale)

    def fwd_bwd():
        x = [t.detach().requires_grad_() for t in (q, k, v)]
        fn(*x, window, scale).backward(dout)
    for _ in range(3):
        fwd_bwd()
    return errs, timed(fwd, reps), timed(fwd_bwd, reps)


def shape_arguments(doc: str) -> argparse.ArgumentParser:
    """The command line of the attention benchmarks: the 12B's attention shape, the window, repetitions."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--reps", type=int, default=20)
    return p


def inputs(a, dev, g=None):
    """q, k, v and the output's gradient for ``a``'s shape (bf16; from generator ``g``, else one seeded 0)."""
    g = g if g is not None else torch.Generator(device=dev).manual_seed(0)
    shapes = [(1, a.heads, a.seq, a.dim), (1, a.kv_heads, a.seq, a.dim), (1, a.kv_heads, a.seq, a.dim),
              (1, a.heads, a.seq, a.dim)]
    return [torch.randn(*shape, device=dev, dtype=torch.bfloat16, generator=g) for shape in shapes]


def main() -> None:
    a = shape_arguments(__doc__).parse_args()
    from torch.nn.attention import SDPBackend

    dev, s, scale = "cuda", a.seq, a.dim ** -0.5
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; batch 1, seq {s}, heads {a.heads}/"
          f"{a.kv_heads}, dim {a.dim}, bf16; window {a.window}")
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, dout = inputs(a, dev, g)  # then the window check's inputs from the same generator, as in call 47
    small = [torch.randn(1, h, 256, a.dim, device=dev, dtype=torch.bfloat16, generator=g)
             for h in (a.heads, a.kv_heads, a.kv_heads)]
    got = flash(*small, 16, scale).float()
    print("# flash window 16 at seq 256 against references of window 15/16/17 (max abs error): " + " ".join(
        f"{(got - reference(*small, w, scale)).abs().max().item():.4f}" for w in (15, 16, 17)))
    from trinity_core.train.dense_attention import load_cudnn_frontend

    frontend_error = load_cudnn_frontend()
    print(f"# cudnn-frontend: {frontend_error or 'torch.ops.cudnn.sdpa_fwd'}")
    for kind, window in (("sliding", a.window), ("global", 0)):
        keys = sum(min(i + 1, window) if window else i + 1 for i in range(s))
        flop_fwd = 4 * a.heads * a.dim * keys
        ref_vals = reference_values(q, k, v, dout, window, scale)
        kernels = {"flex (compiled, IS_DIVISIBLE)": make_flex(s, window, dev), "flash-2 (aten, window)": flash}
        if frontend_error is None:
            kernels["cudnn-frontend (band)" if window else "cudnn-frontend"] = cudnn_frontend
        if not window:
            kernels["sdpa cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
            kernels["sdpa flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
        for name, fn in kernels.items():
            try:
                errs, t_fwd, t_all = measure(fn, q, k, v, dout, window, scale, ref_vals, a.reps)
                print(f"{kind:8s} {name:32s} fwd {t_fwd:7.3f} ms ({flop_fwd / t_fwd / 1e9:6.1f} TFLOP/s)  "
                      f"fwd+bwd {t_all:7.3f} ms ({3.5 * flop_fwd / t_all / 1e9:6.1f} TFLOP/s)  "
                      f"rel err out/dq/dk/dv {' '.join(f'{e:.1e}' for e in errs)}", flush=True)
            except Exception as e:  # noqa: BLE001 - a kernel that does not apply is a row, not a crash
                print(f"{kind:8s} {name:32s} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    main()
