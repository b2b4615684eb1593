"""The label audit: every assistant turn's trained labels hold the turn terminator, or the job says which
rows do not (a fine-tune that never learned to stop is what users of Gemma GGUFs complain about)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from tests.data.cases import write_jsonl
from trinity_core.data.prepare import Example, prepare_data
from trinity_core.errors import DatasetError, TurnEndNotTrained
from trinity_core.data.label_audit import audit_turn_ends, trained_runs, turn_terminator
from trinity_core.spec import DataSpec, JobSpec
from trinity_core.data.template import tokenize_conversation

ROOT = Path(__file__).resolve().parents[2]
ROWS = [json.loads(line) for line in (ROOT / "examples/data/tiny-chat.jsonl").read_text().splitlines()]

# A template that closes a turn only when the next one opens (seen in the wild): the last reply is never
# followed by <end_of_turn>, and earlier ones get it outside the assistant span, so it is never trained.
CLOSES_ON_NEXT_TURN = (
    "{{ bos_token }}{% for m in messages %}{% if not loop.first %}<end_of_turn>\n{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<end_of_turn>\n<start_of_turn>model\n{% endif %}"
)


def _spec(path, **data) -> JobSpec:
    return JobSpec(data=DataSpec(path=str(path), **data))


def _examples(tokenizer, rows=ROWS, **kw) -> list[Example]:
    return [Example(i, r["messages"], *tokenize_conversation(tokenizer, r["messages"], **kw))
            for i, r in enumerate(rows, 1)]


def test_terminator_comes_from_the_template(tokenizer):
    t = turn_terminator(tokenizer)
    assert t.token == "<end_of_turn>" and t.id == tokenizer.convert_tokens_to_ids("<end_of_turn>")


def test_the_shipped_template_trains_every_turn_end(tokenizer):
    assert audit_turn_ends(_examples(tokenizer), turn_terminator(tokenizer)) == []


def test_a_masked_terminator_is_caught_with_its_row_and_turn(tokenizer):
    """What a collator that masks special tokens does: the terminator's labels become -100."""
    t = turn_terminator(tokenizer)
    examples = _examples(tokenizer)
    two_turns = next(i for i, e in enumerate(examples) if sum(m["role"] == "assistant" for m in e.messages) == 2)
    e = examples[two_turns]
    at = [i for i, tok in enumerate(e.input_ids) if tok == t.id and e.assistant_masks[i]]
    masks = list(e.assistant_masks)
    masks[at[1]] = 0  # the second reply's terminator
    examples[two_turns] = e._replace(assistant_masks=masks)
    found = audit_turn_ends(examples, t)
    assert [(f["row"], f["turns"]) for f in found] == [(two_turns + 1, [2])]
    assert "<end_of_turn> is not trained in assistant turn(s) 2 of 2" in found[0]["message"]


def test_truncation_that_cuts_the_terminator_is_caught(tokenizer):
    t = turn_terminator(tokenizer)
    ids, _ = tokenize_conversation(tokenizer, ROWS[0]["messages"])
    cut = _examples(tokenizer, ROWS[:1], max_seq_length=len(ids) - 2, truncate=True)  # drops "<end_of_turn>\n"
    assert trained_runs(cut[0].input_ids, cut[0].assistant_masks)  # the reply is still trained ...
    assert [f["row"] for f in audit_turn_ends(cut, t)] == [1]  # ... but not its end


def test_prepare_data_refuses_a_template_that_never_trains_the_terminator(tokenizer, tmp_path):
    bad = copy.deepcopy(tokenizer)
    bad.chat_template = CLOSES_ON_NEXT_TURN
    assert turn_terminator(bad).token == "<end_of_turn>"  # the template still writes it, between turns
    path = write_jsonl(tmp_path / "s.jsonl", ROWS[:6])
    with pytest.raises(TurnEndNotTrained) as err:
        prepare_data(_spec(path), bad, tmp_path / "d", max_seq_length=256)
    assert isinstance(err.value, DatasetError) and err.value.code == "turn_end_not_trained"
    assert [d["row"] for d in err.value.details] == [1, 2, 3, 4, 5, 6]
    assert "lines 1, 2, 3, 4, 5, 6" in err.value.message and "data.turn_end_check" in err.value.message
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert report["error_counts"] == {"turn_end_untrained": 6}


def test_warn_lets_it_train_and_lists_the_rows(tokenizer, tmp_path):
    bad = copy.deepcopy(tokenizer)
    bad.chat_template = CLOSES_ON_NEXT_TURN
    path = write_jsonl(tmp_path / "s.jsonl", ROWS[:6])
    prepared = prepare_data(_spec(path, turn_end_check="warn"), bad, tmp_path / "d", max_seq_length=256)
    assert prepared.report.ok and prepared.report.warning_counts == {"turn_end_untrained": 6}
    assert prepared.report.stats["turn_end"] == {"token": "<end_of_turn>", "id": turn_terminator(bad).id,
                                                 "rows_checked": 6, "rows_untrained": 6, "rows_truncated": 0}


def test_prepare_data_records_the_clean_audit(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", ROWS[:6])
    prepared = prepare_data(_spec(path), tokenizer, tmp_path / "d", max_seq_length=256)
    assert prepared.report.stats["turn_end"]["rows_untrained"] == 0
    assert prepared.report.stats["turn_end"]["rows_checked"] == 6


def test_a_template_with_no_turn_end_at_all_is_refused(tokenizer):
    bad = copy.deepcopy(tokenizer)
    bad.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(DatasetError, match="no special token after an assistant reply"):
        turn_terminator(bad)


def test_evaluation_gets_none_instead_of_an_error(tokenizer):
    """The report generates with whatever template it has: no terminator means eos alone stops it."""
    bad = copy.deepcopy(tokenizer)
    bad.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert turn_terminator(bad, required=False) is None
    bad.chat_template = "{{ raise_exception('no') }}"
    assert turn_terminator(bad, required=False) is None
