"""Chat template + loss mask: tokens for a conversation, with loss only on the assistant's tokens.

The mask is found by rendering prefixes with the tokenizer's own chat template: for the k-th turn
(an assistant turn), ``messages[:k]`` with ``add_generation_prompt=True`` ends where the reply
starts and ``messages[:k+1]`` ends after the reply's end-of-turn marker. Each piece of the rendered
text is tokenised on its own with ``add_special_tokens=False`` (the template already writes bos),
so the prompt is cut into tokens exactly as at inference, where generation starts after the prompt.
Trained: the reply and its end marker (``<end_of_turn>`` for Gemma), so the model learns to stop;
whitespace the template writes after the marker is not trained.
"""

from __future__ import annotations

from typing import Any

from trinity_core.errors import DatasetError


def render(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
    """The conversation as text, through the tokenizer's chat template."""
    from jinja2 import TemplateError  # raise_exception() in a template raises it

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise DatasetError(f"the chat template rejected this conversation: {e}") from None


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``(start, end)`` character spans of the trained text."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DatasetError("the tokenizer has no chat template")
    text = render(tokenizer, messages)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:k], add_generation_prompt=True)
        upto = render(tokenizer, messages[: k + 1])
        if not (text.startswith(prompt) and text.startswith(upto) and len(upto) >= len(prompt)):
            raise DatasetError(f"the chat template does not render turn {k + 1} as a prefix of the whole "
                               "conversation, so the loss mask cannot be built")  # fmt: skip
        spans.append((len(prompt), len(upto.rstrip())))
    return text, spans


def tokenize_conversation(
    tokenizer: Any, messages: list[dict[str, str]], max_seq_length: int | None = None, *, truncate: bool = False
) -> tuple[list[int], list[int]]:
    """``(input_ids, assistant_masks)`` for canonical ``messages``: mask 1 on assistant tokens only.

    A conversation longer than ``max_seq_length`` raises :class:`DatasetError` unless ``truncate``
    (then the start is kept).
    """
    text, spans = assistant_spans(tokenizer, messages)
    pieces, trained, at = [], [], 0
    for start, end in spans:
        pieces += [text[at:start], text[start:end]]
        trained += [0, 1]
        at = end
    pieces.append(text[at:])
    trained.append(0)
    keep = [i for i, p in enumerate(pieces) if p]
    encoded = tokenizer([pieces[i] for i in keep], add_special_tokens=False)["input_ids"]
    input_ids: list[int] = []
    masks: list[int] = []
    for i, ids in zip(keep, encoded, strict=True):
        input_ids += ids
        masks += [trained[i]] * len(ids)
    if max_seq_length is not None and len(input_ids) > max_seq_length:
        if not truncate:
            raise DatasetError(f"{len(input_ids)} tokens > max_seq_length {max_seq_length}")
        input_ids, masks = input_ids[:max_seq_length], masks[:max_seq_length]
    return input_ids, masks


def show_masked(tokenizer: Any, input_ids: list[int], masks: list[int], *, left: str = "[[", right: str = "]]") -> str:
    """Decoded text with trained runs wrapped in ``left``/``right`` (plain text, for a terminal or log)."""
    out, run, state = [], [], None
    for token, m in [*zip(input_ids, masks, strict=True), (None, None)]:
        if m != state and run:
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append(f"{left}{text}{right}" if state else text)
            run = []
        state = m
        if token is not None:
            run.append(token)
    return "".join(out)
