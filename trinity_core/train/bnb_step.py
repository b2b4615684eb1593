"""bitsandbytes' optimizer step without its device synchronisation after every parameter.

``bitsandbytes.optim.optimizer.Optimizer8bit.step`` (0.50.2) calls ``torch.cuda.synchronize()`` after each
parameter's update (``sync_gpu(p)``), paged or not: the host waits for every update kernel before it launches the
next one. With fast DoRA the recipe's 8-bit AdamW holds 1,008 tensors at the 12B shape (A, B and the magnitudes)
against LoRA's 672; in one H200 profile the DoRA row's optimizer step took 93.5 ms of host time against 36.0 ms
(docs/BENCHMARKS.md, "Goal 1, 2026-11-29 (late)", call 21). bitsandbytes launches a non-paged update on the legacy
default stream; when that is also torch's current stream, every kernel that produced a gradient is ordered before
the update and every later reader after it, so the synchronisation orders nothing (the open bitsandbytes pull
request #2050 drops it for non-paged CUDA optimizers for the same reason).

:func:`without_per_parameter_sync` makes one optimizer's steps skip it: only for a non-paged optimizer, only while
torch's current stream is the default stream. How, without touching the optimizer's ``step`` attribute (the LR
scheduler wraps it, and accelerate swaps it on every fp16 step): the name ``sync_gpu`` in bitsandbytes' optimizer
module becomes :func:`_sync_unless_skipped`, which calls bitsandbytes' own ``sync_gpu`` except during a chosen
optimizer's step; a global optimizer pre-step hook decides that at the start of every step of every optimizer, so a
step that raised cannot leave another optimizer's syncs skipped.

Measured (H200, 12B shape, 48 layers, call 24): fast DoRA 5900.2 → 5916.1 tok/s, compiled LoRA 6096.5 → 6156.5.
The job path uses it (``train/trainer.py``, ``ENABLED``).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

ENABLED = True
"""``train/trainer.py`` applies :func:`without_per_parameter_sync` to each job's optimizer (False: bitsandbytes'
own step, for an A/B)."""

_chosen: weakref.WeakSet = weakref.WeakSet()
_state = threading.local()  # .skip: during a chosen optimizer's step, in this thread
_install_lock = threading.Lock()
_hooks: list = []


def without_per_parameter_sync(optimizer: Any) -> bool:
    """Make ``optimizer`` (a bitsandbytes 8-bit or 32-bit optimizer) step without ``torch.cuda.synchronize()``
    after each parameter, as the module docstring says. Returns whether it did (False: not a bitsandbytes
    optimizer, a paged one, or already done)."""
    from bitsandbytes.optim.optimizer import Optimizer8bit

    if not isinstance(optimizer, Optimizer8bit) or getattr(optimizer, "is_paged", False) or optimizer in _chosen:
        return False
    _install()
    _chosen.add(optimizer)
    return True


def chosen(optimizer: Any) -> bool:
    """Whether ``optimizer``'s steps skip bitsandbytes' per-parameter sync."""
    return optimizer in _chosen


def _install() -> None:
    from bitsandbytes.optim import optimizer as bnb_optimizer
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    with _install_lock:
        if bnb_optimizer.sync_gpu is not _sync_unless_skipped:
            bnb_optimizer.sync_gpu = _sync_unless_skipped
        if not _hooks:
            _hooks.extend([register_optimizer_step_pre_hook(_before_step),
                           register_optimizer_step_post_hook(_after_step)])


def _before_step(optimizer, args, kwargs) -> None:
    _state.skip = optimizer in _chosen and (
        not torch.cuda.is_available() or torch.cuda.current_stream() == torch.cuda.default_stream())


def _after_step(optimizer, args, kwargs) -> None:
    _state.skip = False


def _sync_unless_skipped(tensor: torch.Tensor) -> None:
    """bitsandbytes' ``sync_gpu`` (looked up at each call), except during a chosen optimizer's step."""
    if getattr(_state, "skip", False):
        return
    from bitsandbytes import utils

    utils.sync_gpu(tensor)


__all__ = ["ENABLED", "chosen", "without_per_parameter_sync"]
