"""Before training: every assistant turn's trained labels must include the turn terminator.

A model learns to stop only if the token that ends its turn (``<end_of_turn>`` for Gemma-3,
``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama-3) is among its labels. When a chat template
closes a turn only when the next one opens, a collator masks the terminator, or truncation cuts it,
the fine-tune never learns to end its reply and its GGUF "never stops" in llama.cpp and Ollama.

The terminator is read from the tokenizer's own chat template (:func:`turn_terminator`): the first
token the template writes after an assistant reply, in a conversation that goes on with a user turn.
The audit (:func:`audit_turn_ends`) then splits each row's loss mask into its trained runs, one per
assistant turn, and names every row (and turn) whose run does not hold that token.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from trinity_core.errors import DatasetError
from trinity_core.data.template import render

_PROBE_REPLY = "Trinity probe reply"  # any text a template leaves as it is


class Terminator(NamedTuple):
    token: str
    id: int


def turn_terminator(tokenizer: Any, *, required: bool = True) -> Terminator | None:
    """The token the chat template writes right after an assistant reply.

    Raises :class:`DatasetError` when the template writes nothing after a reply but plain text
    (no special token): then no token tells the model its turn is over (``required=False``: None)."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_REPLY},
                {"role": "user", "content": "Thanks"}]  # fmt: skip
    try:
        text = render(tokenizer, messages)
    except DatasetError:
        if not required:
            return None
        raise
    at = text.find(_PROBE_REPLY)
    after = text[at + len(_PROBE_REPLY):].lstrip() if at >= 0 else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    if not ids or not _special(tokenizer, ids[0]):
        if not required:
            return None
        raise DatasetError("the chat template writes no special token after an assistant reply "
                           f"({after[:40]!r}), so the model cannot learn where its turn ends",
                           param="model.name_or_path")  # fmt: skip
    return Terminator(tokenizer.convert_ids_to_tokens(ids[0]), ids[0])


def _special(tokenizer: Any, token_id: int) -> bool:
    """A special token: named in the special-tokens map, or an added token marked special (Gemma-3's
    published tokenizer lists ``<end_of_turn>`` only among the latter)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return token_id in set(tokenizer.all_special_ids) or bool(getattr(added.get(token_id), "special", False))


def trained_runs(input_ids: list[int], masks: list[int]) -> list[list[int]]:
    """The token ids of each maximal run of trained (mask 1) positions, in order."""
    runs: list[list[int]] = []
    previous = 0
    for token, m in zip(input_ids, masks, strict=True):
        if m and not previous:
            runs.append([])
        if m:
            runs[-1].append(token)
        previous = m
    return runs


def audit_turn_ends(examples: Iterable[Any], terminator: Terminator) -> list[dict[str, Any]]:
    """``[{row, turns, message}]`` for each example (``row``, ``messages``, ``input_ids``,
    ``assistant_masks``, as :class:`trinity_core.data.Example`) with an assistant turn whose labels
    miss ``terminator``; ``turns`` are 1-based among the row's assistant turns."""
    found = []
    for e in examples:
        n_turns = sum(m["role"] == "assistant" for m in e.messages)
        runs = trained_runs(e.input_ids, e.assistant_masks)
        missing = [k + 1 for k in range(n_turns) if k >= len(runs) or terminator.id not in runs[k]]
        if missing:
            found.append({"row": e.row, "turns": missing,
                          "message": f"{terminator.token} is not trained in assistant turn(s) "
                                     f"{', '.join(map(str, missing))} of {n_turns}"})  # fmt: skip
    return found
