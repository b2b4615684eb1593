"""Gemma-3's two flex-attention block masks as transformers builds them, for the mask cache's and the dense
attention's tests."""

from __future__ import annotations

import torch


def flex_config():
    """A small Gemma-3 text config under flex attention, sliding window 64."""
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=32, num_hidden_layers=2, sliding_window=64, vocab_size=100)
    cfg._attn_implementation = "flex_attention"
    return cfg


def gemma3_masks(config, seq, attention_mask=None, position_ids=None):
    """(causal, sliding) block masks of a batch of one, ``seq`` tokens."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    kwargs = dict(config=config, inputs_embeds=torch.zeros(1, seq, 8), attention_mask=attention_mask,
                  past_key_values=None,
                  position_ids=torch.arange(seq).unsqueeze(0) if position_ids is None else position_ids)
    return create_causal_mask(**kwargs), create_sliding_window_causal_mask(**kwargs)
