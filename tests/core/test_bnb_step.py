"""trinity_core.train.bnb_step: bitsandbytes' 8-bit AdamW stepping without its per-parameter device sync. On the CPU
the sync is a no-op anyway, so this checks the mechanism (bitsandbytes' ``sync_gpu`` not called during the wrapped
step, restored after it, also after a raise), that the updates are bitsandbytes' own to the bit, that paged
optimizers are left alone, and that torch's optimizer hooks still run."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from bitsandbytes.optim import optimizer as bnb_optimizer  # noqa: E402

from trinity_core.train.bnb_step import without_per_parameter_sync  # noqa: E402


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(64, 96), (300,), (40, 130)]  # 8-bit blockwise and (under 4096 values) 32-bit state
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    return ps


def test_the_step_skips_the_sync_and_updates_as_bitsandbytes_does(monkeypatch):
    calls = []
    own = bnb_optimizer.sync_gpu
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: calls.append(t) or own(t))
    plain, patched = _params(), _params()
    opt_plain = bnb.optim.AdamW8bit(plain, lr=1e-2, min_8bit_size=4096)
    opt_patched = bnb.optim.AdamW8bit(patched, lr=1e-2, min_8bit_size=4096)
    assert without_per_parameter_sync(opt_patched)
    assert not without_per_parameter_sync(opt_patched), "once"
    hooked = []
    opt_patched.register_step_post_hook(lambda *args: hooked.append(1))
    for _ in range(3):
        opt_plain.step()
        assert len(calls) == len(plain), "bitsandbytes syncs after each parameter"
        calls.clear()
        opt_patched.step()
        assert calls == [], "no sync during the wrapped step"
    assert hooked == [1, 1, 1]
    for a, b in zip(plain, patched):
        assert torch.equal(a, b)
    wrapped = bnb_optimizer.sync_gpu
    assert wrapped is not None and wrapped.__name__ == "<lambda>", "restored after the step"


def test_the_sync_is_restored_after_a_raise(monkeypatch):
    ps = _params()
    opt = bnb.optim.AdamW8bit(ps, lr=1e-2)
    without_per_parameter_sync(opt)
    own = bnb_optimizer.sync_gpu

    def failing(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(type(opt), "update_step", failing)
    with pytest.raises(RuntimeError, match="injected"):
        opt.step()
    assert bnb_optimizer.sync_gpu is own


def test_paged_and_other_optimizers_are_left_alone():
    assert not without_per_parameter_sync(bnb.optim.PagedAdamW8bit(_params(), lr=1e-2))
    assert not without_per_parameter_sync(torch.optim.AdamW(_params(), lr=1e-2))
