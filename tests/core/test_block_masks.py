"""Flex attention's block masks built once per shape (``trinity_core.train.block_masks``): the cached mask is the
mask transformers builds, and what it cannot key (padding, packed sequences) is built as before."""

from __future__ import annotations

import pytest
import torch

from tests.core.flex_masks import flex_config, gemma3_masks
from trinity_core.train import block_masks


@pytest.fixture
def cached():
    block_masks.uninstall()
    masks = block_masks.install()
    assert masks is not None and block_masks.installed() is masks and block_masks.install() is masks
    yield masks
    block_masks.uninstall()


@pytest.fixture(scope="module")
def config():
    return flex_config()


def _dense(mask):
    """Which key each query attends, token by token: the mask function over every pair, within the blocks the
    block mask lists (a block-level comparison alone would not see the sliding window inside a block)."""
    from torch.nn.attention.flex_attention import create_mask

    q_len, kv_len = mask.shape[-2:]
    blocks = mask.to_dense().repeat_interleave(mask.BLOCK_SIZE[0], -2).repeat_interleave(mask.BLOCK_SIZE[1], -1)
    return create_mask(mask.mask_mod, 1, 1, q_len, kv_len, device="cpu") & blocks[..., :q_len, :kv_len].bool()


def test_a_shape_s_masks_are_built_once_and_are_transformers_masks(config, cached):
    first = gemma3_masks(config, 256)
    assert (cached.misses, cached.hits) == (2, 0), "causal and sliding: two entries"
    again = gemma3_masks(config, 256)
    assert again[0] is first[0] and again[1] is first[1]
    assert cached.hits == 2
    block_masks.uninstall()
    assert block_masks.installed() is None
    plain = gemma3_masks(config, 256)
    assert plain[0] is not first[0]
    for ours, theirs in zip(first, plain):
        assert torch.equal(_dense(ours), _dense(theirs))
    assert not torch.equal(_dense(first[0]), _dense(first[1])), "the sliding window is part of the key"


def test_another_length_is_another_mask(config, cached):
    long, short = gemma3_masks(config, 256), gemma3_masks(config, 128)
    assert cached.misses == 4 and short[0] is not long[0]
    assert short[0].shape[-2:] == (128, 128) and long[0].shape[-2:] == (256, 256)


def test_an_all_ones_padding_mask_shares_the_entry_a_padded_batch_is_built_as_before(config, cached):
    seq = 128
    none = gemma3_masks(config, seq)
    ones = gemma3_masks(config, seq, attention_mask=torch.ones(1, seq, dtype=torch.long))
    assert ones[0] is none[0] and ones[1] is none[1]
    padded = torch.ones(1, seq, dtype=torch.long)
    padded[0, -10:] = 0
    ours = gemma3_masks(config, seq, attention_mask=padded)
    assert cached.uncached == 2 and ours[0] is not none[0]
    block_masks.uninstall()
    theirs = gemma3_masks(config, seq, attention_mask=padded)
    for a, b in zip(ours, theirs):
        assert torch.equal(_dense(a), _dense(b))
    assert not torch.equal(_dense(ours[0]), _dense(none[0])), "the padded keys are masked out"


def test_packed_sequences_are_built_as_before(config, cached):
    seq = 128
    restart = torch.cat([torch.arange(64), torch.arange(64)]).unsqueeze(0)  # two sequences in one row
    ours = gemma3_masks(config, seq, position_ids=restart)
    assert cached.uncached == 2 and not cached.entries
    block_masks.uninstall()
    theirs = gemma3_masks(config, seq, position_ids=restart)
    for a, b in zip(ours, theirs):
        assert torch.equal(_dense(a), _dense(b))


def test_the_cache_keeps_the_newest_masks_only(config, cached, monkeypatch):
    monkeypatch.setattr(block_masks, "MAX_ENTRIES", 3)
    for seq in (128, 256, 384):
        gemma3_masks(config, seq)
    assert len(cached.entries) == 3
    assert [key[1] for key in cached.entries] == [256, 384, 384], "least recently used dropped first"


def test_a_mask_function_over_a_tensor_has_no_key():
    from transformers.masking_utils import and_masks, causal_mask_function, padding_mask_function

    window = block_masks._structure(and_masks(causal_mask_function))
    assert window == block_masks._structure(and_masks(causal_mask_function)), "a fresh closure, the same key"
    with pytest.raises(block_masks._Uncacheable):
        block_masks._structure(and_masks(causal_mask_function, padding_mask_function(torch.ones(1, 4, dtype=bool))))


def test_the_model_computes_the_same_with_cached_masks(tiny_spec, cached):
    """The tiny Gemma-3 with flex attention (forward only: flex attention has no backward on the CPU): its
    logits the same with the cache, and the second forward builds no mask."""
    from trinity_core.train.backends.peft import PeftBackend

    spec = tiny_spec.model_copy(deep=True)
    spec.model.attention = "flex_attention"
    model, _ = PeftBackend().load(spec)
    assert model.config._attn_implementation == "flex_attention"
    ids = torch.randint(7, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = model(input_ids=ids).logits
        built = cached.misses
        second = model(input_ids=ids).logits
        assert cached.misses == built and cached.hits >= 1
        block_masks.uninstall()
        plain = model(input_ids=ids).logits
    assert torch.equal(first, second) and torch.equal(first, plain)
