"""Tokens + loss mask with the real Gemma-3 chat template: loss only on assistant text + <end_of_turn>."""

from __future__ import annotations

import pytest

from tests.data.cases import USE_CASES, rows_for
from trinity_core.errors import DatasetError
from trinity_core.data.formats import resolve_mapping, to_messages
from trinity_core.data.template import show_masked, tokenize_conversation


def _runs(ids, masks):
    """Maximal runs of consecutive trained tokens."""
    runs, current = [], []
    for token, m in zip(ids, masks, strict=True):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("case", list(USE_CASES))
def test_trained_tokens_decode_to_exactly_the_assistant_texts(case, tokenizer):
    rows = rows_for(case, 4)
    mapping = resolve_mapping(rows)
    for row in rows:
        messages, problems = to_messages(row, mapping)
        assert not problems
        ids, masks = tokenize_conversation(tokenizer, messages)
        assert len(ids) == len(masks) and set(masks) == {0, 1}
        replies = [m["content"].strip() + "<end_of_turn>" for m in messages if m["role"] == "assistant"]
        assert [tokenizer.decode(run) for run in _runs(ids, masks)] == replies
        # the untrained part is everything else: bos, turn markers, system, user turns
        assert ids[0] == tokenizer.bos_token_id and masks[0] == 0
        untrained = tokenizer.decode([t for t, m in zip(ids, masks, strict=True) if not m])
        for m in messages:
            if m["role"] != "assistant":
                assert m["content"].strip() in untrained
        # the pieces tokenised separately give the same tokens as the whole rendered text here
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert tokenizer.decode(ids) == text


def test_multi_turn_masks_each_reply_and_nothing_between(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"},
                {"role": "assistant", "content": "1"}, {"role": "user", "content": "Two?"},
                {"role": "assistant", "content": "  2 and more\n"}]  # fmt: skip
    ids, masks = tokenize_conversation(tokenizer, messages)
    # the Gemma-3 template trims each turn, so the trained text is the trimmed reply
    assert [tokenizer.decode(r) for r in _runs(ids, masks)] == ["1<end_of_turn>", "2 and more<end_of_turn>"]
    shown = show_masked(tokenizer, ids, masks)
    assert "model\n[[1<end_of_turn>]]\n<start_of_turn>user\nTwo?" in shown
    assert shown.endswith("[[2 and more<end_of_turn>]]\n")
    assert shown.startswith("<bos><start_of_turn>user\nBe brief.\n\nOne?<end_of_turn>")


def test_max_seq_length_rejects_or_truncates(tokenizer):
    messages = [{"role": "user", "content": "Tell me a long story."},
                {"role": "assistant", "content": "Once upon a time " * 20}]  # fmt: skip
    full, _ = tokenize_conversation(tokenizer, messages)
    with pytest.raises(DatasetError, match=f"{len(full)} tokens > max_seq_length 20"):
        tokenize_conversation(tokenizer, messages, 20)
    ids, masks = tokenize_conversation(tokenizer, messages, 20, truncate=True)
    assert ids == full[:20] and len(masks) == 20


def test_template_errors_become_dataset_errors(tokenizer):
    with pytest.raises(DatasetError, match="chat template rejected"):
        tokenize_conversation(tokenizer, [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}])
    no_template = type("T", (), {"chat_template": None})()
    with pytest.raises(DatasetError, match="no chat template"):
        tokenize_conversation(no_template, [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}])
