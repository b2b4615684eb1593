"""Format detection, column mapping and conversion to the canonical chat form."""

from __future__ import annotations

import pytest

from tests.data.cases import USE_CASES, rows_for, write_jsonl
from trinity_core.data.prepare import validate_file
from trinity_core.data.formats import resolve_mapping, to_messages


@pytest.mark.parametrize("case", list(USE_CASES))
def test_each_use_case_is_detected_mapped_and_valid(case, tmp_path):
    _, fmt, mapping, ignored = USE_CASES[case]
    report = validate_file(write_jsonl(tmp_path / f"{case}.jsonl", rows_for(case)))
    assert report.ok, report.errors
    assert report.format == fmt
    assert report.mapping == mapping
    assert report.stats["rows"] == report.stats["valid_rows"] == 12
    for name in ignored:  # extra columns are ignored, and the note says so
        assert name not in report.mapping
        assert f"ignored fields: {name}" in report.mapping_note or f", {name}" in report.mapping_note
    for src, dst in mapping.items():
        assert f"{src} -> {dst}" in report.mapping_note


def test_alpaca_conversion_uses_instruction_input_output_and_system():
    mapping = resolve_mapping([{"instruction": "Sum", "input": "1 2", "output": "3", "system": "Be exact."}])
    messages, problems = to_messages({"instruction": "Sum", "input": "1 2", "output": "3", "system": "Be exact."},
                                     mapping)  # fmt: skip
    assert problems == []
    assert messages == [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Sum\n\n1 2"},
                        {"role": "assistant", "content": "3"}]  # fmt: skip


@pytest.mark.parametrize("case,columns", [
    ("medical", {"question": "instruction", "answer": "output"}),
    ("creative", {"prompt": "instruction", "story": "response"}),  # response is an alias of output
    ("reasoning", {"problem": "prompt", "solution": "output"}),  # prompt is an alias of instruction
])  # fmt: skip
def test_explicit_columns_convert_without_scripts(case, columns, tmp_path):
    report = validate_file(write_jsonl(tmp_path / "d.jsonl", rows_for(case)), columns=columns)
    assert report.ok, report.errors
    assert "(auto)" not in report.mapping_note
    row = rows_for(case, 1)[0]
    messages, _ = to_messages(row, resolve_mapping([row], columns=columns))
    src_user, src_reply = list(columns)
    assert messages == [{"role": "user", "content": row[src_user]}, {"role": "assistant", "content": row[src_reply]}]


def test_explicit_columns_override_auto_names():
    # both `question` and `prompt` exist; the user says the reply is in `long_answer`
    rows = [{"question": "q", "prompt": "rendered q", "long_answer": "a", "answer": "short"}]
    mapping = resolve_mapping(rows, columns={"prompt": "instruction", "long_answer": "output"})
    assert mapping.fields == {"prompt": "instruction", "long_answer": "output"}
    assert to_messages(rows[0], mapping)[0][1] == {"role": "assistant", "content": "a"}


@pytest.mark.parametrize("row,expected", [
    ({"query": "q", "response": "r"}, {"query": "instruction", "response": "output"}),
    ({"prompt": "p", "completion": "c"}, {"prompt": "instruction", "completion": "output"}),
    ({"input": "i", "output": "o"}, {"input": "instruction", "output": "output"}),
    ({"instruction": "i", "context": "c", "response": "r"},
     {"instruction": "instruction", "context": "input", "response": "output"}),
])  # fmt: skip
def test_auto_mapping_proposals(row, expected):
    mapping = resolve_mapping([row])
    assert mapping.problems == []
    assert mapping.fields == expected


def test_sharegpt_role_names():
    row = {"conversations": [{"from": "system", "value": "s"}, {"from": "user", "value": "u1"},
                             {"from": "model", "value": "a1"}, {"from": "human", "value": "u2"},
                             {"from": "gpt", "value": "a2"}]}  # fmt: skip
    mapping = resolve_mapping([row])
    assert mapping.format == "sharegpt"
    messages, problems = to_messages(row, mapping)
    assert problems == []
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]


def test_openai_rows_ignore_extra_keys():
    row = {"messages": [{"role": "system", "content": "s", "name": "x"}, {"role": "user", "content": "u"},
                        {"role": "assistant", "content": "a", "weight": 1}], "metadata": {"source": "x"}}  # fmt: skip
    messages, problems = to_messages(row, resolve_mapping([row]))
    assert problems == []
    assert messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                        {"role": "assistant", "content": "a"}]  # fmt: skip


def test_explicit_format_and_chat_column_mapping():
    row = {"dialog": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "text": "rendered"}
    mapping = resolve_mapping([row], columns={"dialog": "messages"})
    assert (mapping.format, mapping.fields, mapping.problems) == ("messages", {"dialog": "messages"}, [])
    assert resolve_mapping([row], format="conversations").fields == {"dialog": "conversations"}


def test_bad_mappings_are_reported_naming_the_field(tmp_path):
    path = write_jsonl(tmp_path / "med.jsonl", rows_for("medical"))
    report = validate_file(path, columns={"questoin": "instruction", "answer": "reply"})
    assert not report.ok
    by_field = {e["field"]: e["message"] for e in report.errors}
    assert "'questoin' is not a field of the data" in by_field["questoin"]
    assert "question, answer" in by_field["questoin"]  # the fields that do exist
    assert "'reply' is not a role field" in by_field["answer"]
    assert all(e["row"] is None and e["kind"] == "bad_mapping" for e in report.errors)


def test_two_fields_mapped_to_one_role_and_no_reply_field():
    mapping = resolve_mapping([{"a": "x", "b": "y"}], columns={"a": "instruction", "b": "prompt"})
    assert any("both mapped to 'instruction'" in p.message for p in mapping.problems)
    mapping = resolve_mapping([{"question": "q", "cot": "c"}])
    assert [p.field for p in mapping.problems] == ["output"]
    assert "no field for the assistant reply" in mapping.problems[0].message


def test_unrecognised_fields_ask_for_a_mapping():
    mapping = resolve_mapping([{"text": "<start_of_turn>user ..."}])
    assert {p.field for p in mapping.problems} == {"instruction", "output"}
    assert "fields are text" in mapping.problems[0].message
