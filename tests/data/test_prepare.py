"""prepare_data: what a job runs. Canonical files, pre-tokenised datasets, seeded eval split."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.data.cases import USE_CASES, rows_for, write_jsonl
from trinity_core.data import prepare_data, read_jsonl, split_indices
from trinity_core.errors import DatasetError
from trinity_core.spec import DataSpec, JobSpec


def _spec(path, **data) -> JobSpec:
    return JobSpec(data=DataSpec(path=str(path), **data))


@pytest.mark.parametrize("case", list(USE_CASES))
def test_prepare_each_use_case(case, tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "src.jsonl", rows_for(case))
    out = tmp_path / "data"
    prepared = prepare_data(_spec(path), tokenizer, out, max_seq_length=512)
    assert prepared.format == USE_CASES[case][1]
    assert prepared.mapping == USE_CASES[case][2]
    assert (len(prepared.train), len(prepared.eval)) == (11, 1)  # round(12 * 5%) = 1
    assert prepared.train.column_names == ["input_ids", "assistant_masks"]
    for row in prepared.train:
        assert len(row["input_ids"]) == len(row["assistant_masks"]) <= 512
        assert 0 < sum(row["assistant_masks"]) < len(row["input_ids"])
    train, held = read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")
    assert len(train) == 11 and len(held) == 1 and set(train[0]) == {"messages"}
    assert prepared.sha256 == hashlib.sha256((out / "train.jsonl").read_bytes()
                                             + (out / "eval.jsonl").read_bytes()).hexdigest()  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and report["stats"]["train_rows"] == 11 and report["stats"]["sha256"] == prepared.sha256
    assert report["stats"]["length"]["unit"] == "tokens"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_tokens_match_the_canonical_rows(tmp_path, tokenizer):
    from trinity_core.template import tokenize_conversation

    prepared = prepare_data(_spec(write_jsonl(tmp_path / "s.jsonl", rows_for("chat"))), tokenizer, tmp_path / "d",
                            max_seq_length=512)  # fmt: skip
    first = read_jsonl(tmp_path / "d" / "train.jsonl")[0]["messages"]
    ids, masks = tokenize_conversation(tokenizer, first)
    assert prepared.train[0] == {"input_ids": ids, "assistant_masks": masks}


def test_eval_split_is_seeded_and_deterministic(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "s.jsonl", rows_for("medical", 40))

    def held_out(seed, name):
        spec = _spec(path, eval_fraction=0.25)
        spec.train.seed = seed
        prepare_data(spec, tokenizer, tmp_path / name, max_seq_length=512)
        return [r["messages"][0]["content"] for r in read_jsonl(tmp_path / name / "eval.jsonl")]

    a, b, c = held_out(1, "a"), held_out(1, "b"), held_out(2, "c")
    assert len(a) == 10 and a == b and a != c
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()


@pytest.mark.parametrize("n,fraction,min_rows,expected", [
    (100, 0.05, 1, 5), (10, 0.05, 1, 1), (10, 0.0, 0, 0), (10, 0.05, 3, 3), (1, 0.05, 1, 0), (2, 0.5, 5, 1),
])  # fmt: skip
def test_split_sizes(n, fraction, min_rows, expected):
    train, held = split_indices(n, fraction=fraction, min_rows=min_rows, seed=3407)
    assert len(held) == expected and len(train) == n - expected and sorted(train + held) == list(range(n))


def test_bad_rows_fail_the_job_listing_every_row(tmp_path, tokenizer):
    rows = rows_for("medical", 6)
    rows[2] = {"question": "q"}
    rows[4] = {"question": 3, "answer": "a"}
    rows.append(rows[0])
    with pytest.raises(DatasetError) as info:
        prepare_data(_spec(write_jsonl(tmp_path / "s.jsonl", rows)), tokenizer, tmp_path / "d", max_seq_length=512)
    err = info.value
    assert [(d["row"], d["field"], d["kind"]) for d in err.details] == [
        (3, "answer", "missing_field"), (5, "question", "wrong_type"), (7, None, "duplicate")]
    assert "7 lines, 4 valid; 3 error(s)" in err.message
    assert json.loads((tmp_path / "d" / "report.json").read_text())["ok"] is False
    assert not (tmp_path / "d" / "train.jsonl").exists()


def test_drop_invalid_rows_drops_and_records_them(tmp_path, tokenizer):
    rows = rows_for("creative", 8) + [{"prompt": "p", "story": ""}]
    spec = _spec(write_jsonl(tmp_path / "s.jsonl", rows), drop_invalid_rows=True)
    prepared = prepare_data(spec, tokenizer, tmp_path / "d", max_seq_length=512)
    assert len(prepared.train) + len(prepared.eval) == 8
    assert prepared.report.stats["dropped_rows"] == 1
    assert prepared.report.errors[0]["row"] == 9


def test_long_rows_fail_or_truncate_for_the_oom_ladder(tmp_path, tokenizer):
    rows = rows_for("reasoning", 6) + [{"problem": "Explain. " * 5, "solution": "Because " * 60}]
    spec = _spec(write_jsonl(tmp_path / "s.jsonl", rows), eval_fraction=0.0, eval_min_rows=0)
    with pytest.raises(DatasetError) as info:
        prepare_data(spec, tokenizer, tmp_path / "d", max_seq_length=64)
    assert [(d["row"], d["kind"]) for d in info.value.details] == [(7, "too_long")]
    prepared = prepare_data(spec, tokenizer, tmp_path / "d", max_seq_length=64, truncate=True)
    assert max(len(r) for r in prepared.train["input_ids"]) == 64
    assert prepared.report.warning_counts == {"truncated": 1}


def test_save_to_disk_directory_through_the_spec(tmp_path, tokenizer):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows_for("sharegpt", 5)),
                          "other": datasets.Dataset.from_list(rows_for("sharegpt", 2))}).save_to_disk(tmp_path / "dd")
    prepared = prepare_data(_spec(tmp_path / "dd"), tokenizer, tmp_path / "d", max_seq_length=512)
    assert prepared.format == "sharegpt" and len(prepared.train) + len(prepared.eval) == 5


def test_mapping_problems_and_unresolved_dataset_id_are_dataset_errors(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "s.jsonl", rows_for("medical"))
    with pytest.raises(DatasetError) as info:
        prepare_data(_spec(path, columns={"query": "instruction"}), tokenizer, tmp_path / "d", max_seq_length=512)
    assert info.value.details[0]["field"] == "query"
    with pytest.raises(DatasetError, match="must be resolved to a file path"):
        prepare_data(JobSpec(data=DataSpec(dataset_id="ds_123")), tokenizer, tmp_path / "d", max_seq_length=512)
