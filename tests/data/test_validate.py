"""Validation reports every problem at once, with 1-based row (line) numbers and field names."""

from __future__ import annotations

import json

from tests.data.cases import rows_for, write_jsonl
from trinity_core.data.prepare import MAX_STORED_PER_KIND, validate_file


def _conv(*turns: tuple[str, object]) -> dict:
    return {"conversations": [{"role": r, "content": c} for r, c in turns]}


GOOD = _conv(("user", "Hello there"), ("assistant", "Hi! How can I help?"))
MALFORMED_LINES = [
    json.dumps(GOOD),  # 1
    '{"conversations": [{"role": "user", "content": "cut off',  # 2 truncated JSON
    json.dumps({"conversations": "hello"}),  # 3 wrong type (not a list)
    json.dumps(_conv(("user", 5), ("assistant", "ok"))),  # 4 wrong type (content)
    json.dumps(_conv(("user", "Say nothing"), ("assistant", "  "))),  # 5 empty assistant turn
    json.dumps(_conv(("narrator", "Once"), ("assistant", "upon"))),  # 6 unknown role
    json.dumps(_conv(("user", "Anyone there?"))),  # 7 no assistant turn
    None,  # 8 invalid UTF-8 (written as bytes below)
    json.dumps({**GOOD, "id": 99}),  # 9 exact duplicate of 1 (ids are ignored)
    json.dumps(_conv(("user", "hello   THERE"), ("assistant", "hi! how can i help?"))),  # 10 near duplicate
    "",  # 11 blank: skipped, but counts as a line
    json.dumps({"conversations": [{"role": "user"}, {"role": "assistant", "content": "x"}]}),  # 12 missing field
    json.dumps([1, 2]),  # 13 not an object
    json.dumps(_conv(("user", "a"), ("user", "b"), ("assistant", "c"))),  # 14 roles out of order
    json.dumps(_conv(("user", "Last one"), ("assistant", "Fine."))),  # 15 valid
]


def _write_malformed(path):
    lines = [line.encode() if line is not None else b'{"conversations": [{"role": "user", "content": "caf\xe9"}]}'
             for line in MALFORMED_LINES]  # fmt: skip
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_malformed_corpus_reports_every_problem_with_line_and_field(tmp_path):
    report = validate_file(_write_malformed(tmp_path / "bad.jsonl"))
    assert not report.ok
    assert report.unit == "line"
    got = {(e["row"], e["field"], e["kind"]) for e in report.errors}
    assert got == {
        (2, None, "invalid_json"),
        (3, "conversations", "wrong_type"),
        (4, "conversations[0].content", "wrong_type"),
        (5, "conversations[1].content", "empty_assistant"),
        (6, "conversations[0].role", "unknown_role"),
        (7, "conversations", "no_assistant"),
        (8, None, "invalid_utf8"),
        (9, None, "duplicate"),
        (12, "conversations[0].content", "missing_field"),
        (13, None, "wrong_type"),
        (14, "conversations", "role_order"),
    }
    messages = {e["row"]: e["message"] for e in report.errors}
    assert messages[2].startswith("invalid JSON")
    assert "'narrator'" in messages[6]
    assert messages[9] == "exact duplicate of line 1"
    assert [(w["row"], w["kind"]) for w in report.warnings] == [(10, "near_duplicate")]
    assert "line 1" in report.warnings[0]["message"]
    s = report.stats
    assert (s["rows"], s["valid_rows"], s["invalid_rows"], s["duplicates"], s["near_duplicates"]) == (14, 3, 11, 1, 1)
    assert report.format == "conversations"


def test_alpaca_row_problems_name_the_source_field(tmp_path):
    rows = [{"question": "q1", "answer": "a1"}, {"question": 7, "answer": ["a"]}, {"question": "q3"},
            {"question": "", "answer": "a4"}, {"question": "q5", "answer": ""}]  # fmt: skip
    report = validate_file(write_jsonl(tmp_path / "med.jsonl", rows))
    got = [(e["row"], e["field"], e["kind"]) for e in report.errors]
    assert got == [(2, "question", "wrong_type"), (2, "answer", "wrong_type"), (3, "answer", "missing_field"),
                   (4, "question", "empty_turn"), (5, "answer", "empty_assistant")]  # fmt: skip
    assert report.errors[0]["message"] == "expected a string, got int"


def test_all_errors_are_counted_but_stored_errors_are_capped(tmp_path):
    rows = [{"instruction": "q", "output": "a"}] + [{"instruction": f"q{i}"} for i in range(MAX_STORED_PER_KIND + 50)]
    report = validate_file(write_jsonl(tmp_path / "d.jsonl", rows))
    assert report.error_counts == {"missing_field": MAX_STORED_PER_KIND + 50}
    assert len(report.errors) == MAX_STORED_PER_KIND
    assert report.stats["invalid_rows"] == MAX_STORED_PER_KIND + 50
    assert "150 missing_field" in report.summary()


def test_length_stats_in_chars_without_tokenizer(tmp_path):
    rows = [{"prompt": "x" * n, "completion": "y"} for n in (9, 19, 29, 39)]
    report = validate_file(write_jsonl(tmp_path / "d.jsonl", rows))
    assert report.stats["length"] == {"unit": "chars", "p50": 20, "p95": 40, "max": 40, "mean": 25.0}
    assert report.stats["max_seq_length"] is None


def test_token_stats_and_too_long_rows_with_a_tokenizer(tmp_path, tokenizer):
    rows = rows_for("medical", 6) + [{"question": "word " * 200, "answer": "ok"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = validate_file(path, tokenizer=tokenizer, max_seq_length=96)
    length = report.stats["length"]
    assert length["unit"] == "tokens" and length["max"] > 96 > length["p50"] > 10
    assert [(e["row"], e["kind"]) for e in report.errors] == [(7, "too_long")]
    assert report.errors[0]["message"] == f"{length['max']} tokens > max_seq_length 96"
    assert report.stats["too_long"] == 1
    assert validate_file(path, tokenizer=tokenizer, max_seq_length=4096).ok


def test_report_round_trips_through_json(tmp_path):
    report = validate_file(_write_malformed(tmp_path / "bad.jsonl"))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False
    assert {"row", "field", "message", "kind"} <= set(data["errors"][0])
    assert data["mapping"] == {"conversations": "conversations"}
    assert data["stats"]["length"]["unit"] == "chars"


def test_exact_copies_of_any_near_duplicate_variant_are_found(tmp_path):
    texts = ["Hello World", "hello world", "hello world", "Hello World", "HELLO  world", "Bye"]
    rows = [{"prompt": t, "completion": "Hi."} for t in texts]
    report = validate_file(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [(e["row"], e["message"]) for e in report.errors] == [
        (3, "exact duplicate of line 2"), (4, "exact duplicate of line 1")]
    assert [(w["row"], w["message"]) for w in report.warnings] == [
        (2, "same text as line 1 up to case and whitespace"), (5, "same text as line 1 up to case and whitespace")]
