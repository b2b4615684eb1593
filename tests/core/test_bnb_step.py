"""trinity_core.train.bnb_step: bitsandbytes' 8-bit AdamW stepping without its per-parameter device sync. On the CPU
the sync is a no-op anyway, so this checks the mechanism (bitsandbytes' ``sync_gpu`` not called during a chosen
optimizer's step, called during any other's, also after a chosen one's step raised), that the updates are
bitsandbytes' own to the bit, that paged optimizers are left alone, that torch's optimizer hooks and an LR
scheduler's wrapper still run, and that the job path's callback finds the optimizer inside accelerate's wrapper."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from trinity_core.train.bnb_step import chosen, without_per_parameter_sync  # noqa: E402


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(64, 96), (300,), (40, 130)]  # 8-bit blockwise and (under 4096 values) 32-bit state
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    return ps


def _counting(monkeypatch) -> list:
    """bitsandbytes' own sync_gpu, counting its calls (the optimizer module's name is bnb_step's wrapper once
    installed, which looks bitsandbytes.utils.sync_gpu up at each call)."""
    from bitsandbytes import utils

    calls = []
    own = utils.sync_gpu
    monkeypatch.setattr(utils, "sync_gpu", lambda t: calls.append(t) or own(t))
    return calls


def test_the_step_skips_the_sync_and_updates_as_bitsandbytes_does(monkeypatch):
    calls = _counting(monkeypatch)
    plain, patched = _params(), _params()
    opt_plain = bnb.optim.AdamW8bit(plain, lr=1e-2, min_8bit_size=4096)
    opt_patched = bnb.optim.AdamW8bit(patched, lr=1e-2, min_8bit_size=4096)
    assert without_per_parameter_sync(opt_patched)
    assert not without_per_parameter_sync(opt_patched), "once"
    assert chosen(opt_patched) and not chosen(opt_plain)
    hooked = []
    opt_patched.register_step_post_hook(lambda *args: hooked.append(1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt_patched, lambda step: 1.0)  # wraps opt_patched.step
    for _ in range(3):
        opt_plain.step()
        assert len(calls) == len(plain), "bitsandbytes syncs after each parameter"
        calls.clear()
        opt_patched.step()
        scheduler.step()
        assert calls == [], "no sync during the chosen optimizer's step"
    assert hooked == [1, 1, 1]
    for a, b in zip(plain, patched):
        assert torch.equal(a, b), "bitsandbytes' own updates"
    from bitsandbytes.optim import optimizer as bnb_optimizer

    bnb_optimizer.sync_gpu(plain[0])
    assert len(calls) == 1, "outside a step the name syncs again"
    calls.clear()
    opt_plain.step()
    assert len(calls) == len(plain), "the other optimizer still syncs after the chosen one's steps"


def test_a_step_that_raises_leaves_no_other_optimizer_unsynced(monkeypatch):
    calls = _counting(monkeypatch)
    ps, others = _params(), _params(1)
    opt = bnb.optim.AdamW8bit(ps, lr=1e-2)
    other = bnb.optim.AdamW8bit(others, lr=1e-2)
    without_per_parameter_sync(opt)
    own_update = type(opt).update_step

    def failing(self, *args, **kwargs):
        if self is opt:
            raise RuntimeError("injected")
        return own_update(self, *args, **kwargs)

    monkeypatch.setattr(type(opt), "update_step", failing)
    with pytest.raises(RuntimeError, match="injected"):
        opt.step()
    other.step()
    assert len(calls) == len(others), "the next optimizer's step syncs as bitsandbytes does"


def test_paged_and_other_optimizers_are_left_alone():
    assert not without_per_parameter_sync(bnb.optim.PagedAdamW8bit(_params(), lr=1e-2))
    assert not without_per_parameter_sync(torch.optim.AdamW(_params(), lr=1e-2))


def test_the_job_path_callback_finds_the_optimizer_inside_accelerates_wrapper(monkeypatch):
    from types import SimpleNamespace

    from trinity_core.train import bnb_step
    from trinity_core.train.trainer import OptimizerStepCallback

    opt = bnb.optim.AdamW8bit(_params(), lr=1e-2)
    callback = OptimizerStepCallback()
    callback.on_train_begin(None, None, None, optimizer=SimpleNamespace(optimizer=opt))
    assert callback.applied and chosen(opt)
    monkeypatch.setattr(bnb_step, "ENABLED", False)
    other, off = bnb.optim.AdamW8bit(_params(), lr=1e-2), OptimizerStepCallback()
    off.on_train_begin(None, None, None, optimizer=other)
    assert not off.applied and not chosen(other)
