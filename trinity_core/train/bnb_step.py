"""bitsandbytes' optimizer step without its device synchronisation after every parameter.

``bitsandbytes.optim.optimizer.Optimizer8bit.step`` (0.50.2) calls ``torch.cuda.synchronize()`` after each
parameter's update (``sync_gpu(p)``), paged or not: the host waits for every update kernel before it launches the
next one. With fast DoRA the recipe's 8-bit AdamW holds 1,008 tensors at the 12B shape (A, B and the magnitudes)
against LoRA's 672; in one H200 profile the DoRA row's optimizer step took 93.5 ms of host time against 36.0 ms,
and the GPU waited on it (docs/BENCHMARKS.md, "Goal 1, 2026-11-29 (late)", call 21). bitsandbytes launches a
non-paged update on the legacy default stream; when that is also torch's current stream, every kernel that
produced a gradient is ordered before the update and every later reader after it, so the synchronisation orders
nothing (the open bitsandbytes pull request #2050 drops it for non-paged CUDA optimizers for the same reason).

:func:`without_per_parameter_sync` makes one optimizer's steps skip it: only for a non-paged optimizer, only while
torch's current stream is the default stream (otherwise the step is bitsandbytes' own). Not measured on a GPU yet:
``bench/gpu_bench.py --no-bnb-sync`` is the A/B; the job path does not use it until that has run.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Iterator
from typing import Any

import torch

_swap_lock = threading.Lock()


def without_per_parameter_sync(optimizer: Any) -> bool:
    """Make ``optimizer`` (a bitsandbytes 8-bit or 32-bit optimizer) step without ``torch.cuda.synchronize()``
    after each parameter, as the module docstring says. Returns whether it did (False: not a bitsandbytes
    optimizer, a paged one, or already done)."""
    from bitsandbytes.optim.optimizer import Optimizer8bit

    if not isinstance(optimizer, Optimizer8bit) or getattr(optimizer, "is_paged", False) \
            or "step" in optimizer.__dict__:
        return False
    own_step = type(optimizer).step  # torch's step wrapper: the optimizer's hooks (fast DoRA's refresh) still run

    def step(self, *args, **kwargs):
        if torch.cuda.is_available() and torch.cuda.current_stream() != torch.cuda.default_stream():
            return own_step(self, *args, **kwargs)
        with _no_sync():
            return own_step(self, *args, **kwargs)

    optimizer.step = types.MethodType(step, optimizer)
    return True


@contextlib.contextmanager
def _no_sync() -> Iterator[None]:
    """bitsandbytes' per-parameter ``sync_gpu`` a no-op for the duration (its module global, looked up at each
    call; the lock keeps two threads' swaps from restoring each other's)."""
    from bitsandbytes.optim import optimizer as bnb_optimizer

    with _swap_lock:
        own = bnb_optimizer.sync_gpu
        bnb_optimizer.sync_gpu = _skip
        try:
            yield
        finally:
            bnb_optimizer.sync_gpu = own


def _skip(tensor: torch.Tensor) -> None:
    """In place of ``bitsandbytes.utils.sync_gpu``: nothing to wait for (module docstring)."""


__all__ = ["without_per_parameter_sync"]
