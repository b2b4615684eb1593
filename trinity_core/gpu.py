"""Device probes in one place: is there a GPU, which compute dtype, how much memory is allocated,
free, or was the peak. Everything imports torch lazily (the API imports trinity_core without it);
without CUDA the probes answer "no GPU" (False, None, 0)."""

from __future__ import annotations

import gc
from typing import Any

GIB = 2**30


def available() -> bool:
    import torch

    return torch.cuda.is_available()


def compute_dtype(name: str) -> Any:
    """The torch dtype of a spec's ``model.compute_dtype``. ``auto``: bf16 where the GPU supports it,
    fp16 on older GPUs (T4), fp32 on CPU."""
    import torch

    if name == "auto":
        if not torch.cuda.is_available():
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


def bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def allocated_gib() -> float:
    """GiB allocated by this process on the current GPU (0 without CUDA)."""
    import torch

    return torch.cuda.memory_allocated() / GIB if torch.cuda.is_available() else 0.0


def peak_gib() -> float:
    """Peak GiB allocated since the last :func:`reset_peak` (0 without CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else 0.0


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def budget_gib() -> float | None:
    """Memory this process may still allocate on the current GPU: free memory, capped by a
    ``torch.cuda.set_per_process_memory_fraction`` limit. None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    device = torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
    # the cap bounds what the caching allocator reserves; its cached-but-free blocks are reusable
    reservable = min(free + torch.cuda.memory_reserved(device), fraction * total)
    return (reservable - torch.cuda.memory_allocated(device)) / GIB


def release(*, report: bool = False) -> None:
    """Drop what unreferenced objects held so the next model starts from an empty card; with
    ``report``, print what still holds CUDA memory afterwards (stderr)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if report:
            report_live_tensors()


def report_live_tensors(top: int = 3, depth: int = 6) -> None:
    """Live CUDA tensors by total size, and for the largest few who refers to them (types only)."""
    import sys

    import torch

    def nbytes(t: torch.Tensor) -> int:
        try:
            return t.untyped_storage().nbytes()
        except Exception:  # noqa: BLE001  (functorch's batched tensors have no storage)
            return 0

    tensors = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.is_cuda and nbytes(obj):
                tensors.append(obj)
        except Exception:  # noqa: BLE001  (proxies that fail isinstance)
            continue
    total = sum(nbytes(t) for t in tensors) / 2**30
    print(f"[memory] allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB, {len(tensors)} live CUDA tensors "
          f"({total:.2f} GiB by storage)", file=sys.stderr, flush=True)
    frame = sys._getframe()
    for t in sorted(tensors, key=lambda t: -nbytes(t))[:top]:
        chain, obj, seen = [], t, {id(tensors), id(frame)}
        for _ in range(depth):
            refs = [r for r in gc.get_referrers(obj) if id(r) not in seen and r is not frame]
            if not refs:
                break
            obj = refs[0]
            seen.add(id(obj))
            name = type(obj).__name__
            if isinstance(obj, dict):
                name += "{" + ",".join(map(str, list(obj)[:4])) + "}"
            chain.append(name)
        print(f"[memory]   {tuple(t.shape)} {t.dtype}: " + " <- ".join(chain), file=sys.stderr, flush=True)

