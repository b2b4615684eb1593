"""prepare_data: what a job runs. Canonical files, pre-tokenised datasets, seeded eval split."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.data.cases import USE_CASES, rows_for, write_jsonl
from trinity_core.data.prepare import prepare_data, read_jsonl, split_indices
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
    from trinity_core.data.template import tokenize_conversation

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
    # the cut row lost its <end_of_turn>: the label audit warns (truncation is the caller's choice), not fails
    assert prepared.report.warning_counts == {"truncated": 1, "turn_end_untrained": 1}
    assert prepared.report.warnings[-1]["row"] == 7 and "truncated" in prepared.report.warnings[-1]["message"]


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


def test_eval_file_is_the_eval_set_validated_like_the_training_file(tmp_path, tokenizer):
    medical = USE_CASES["medical"][0]
    train_path = write_jsonl(tmp_path / "train.jsonl", rows_for("medical", 8))
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [medical(100 + i) for i in range(3)])
    spec = _spec(train_path, eval_path=str(eval_path))
    assert (spec.data.eval_fraction, spec.data.eval_min_rows) == (0.0, 0)  # no held-out split with an eval file
    prepared = prepare_data(spec, tokenizer, tmp_path / "d", max_seq_length=512)
    assert (len(prepared.train), len(prepared.eval)) == (8, 3)  # every training row trains
    held = read_jsonl(tmp_path / "d" / "eval.jsonl")
    assert [r["messages"][0]["content"] for r in held] == [medical(100 + i)["question"] for i in range(3)]
    assert len(read_jsonl(tmp_path / "d" / "train.jsonl")) == 8
    assert prepared.report.stats["eval_rows"] == 3 and prepared.report.stats["eval_source"] == "eval.jsonl"
    assert json.loads((tmp_path / "d" / "eval_report.json").read_text())["stats"]["valid_rows"] == 3

    # bad eval rows fail the job, every row listed and the field named; drop_invalid_rows drops them
    write_jsonl(eval_path, [medical(100), {"question": "q"}, {"question": 3, "answer": "a"}])
    with pytest.raises(DatasetError) as info:
        prepare_data(spec, tokenizer, tmp_path / "e", max_seq_length=512)
    assert info.value.param == "data.eval_path" and info.value.message.startswith("data.eval_path: ")
    assert [(d["row"], d["field"], d["kind"]) for d in info.value.details] == [
        (2, "answer", "missing_field"), (3, "question", "wrong_type")]
    dropped = prepare_data(_spec(train_path, eval_path=str(eval_path), drop_invalid_rows=True), tokenizer,
                           tmp_path / "f", max_seq_length=512)
    assert len(dropped.eval) == 1
    # a missing file, and an uploaded eval dataset the service did not resolve, name their field
    with pytest.raises(DatasetError) as info:
        prepare_data(_spec(train_path, eval_path=str(tmp_path / "nope.jsonl")), tokenizer, tmp_path / "g",
                     max_seq_length=512)
    assert info.value.param == "data.eval_path" and "not found" in info.value.message
    with pytest.raises(DatasetError) as info:
        prepare_data(_spec(train_path, eval_dataset_id="ds-1"), tokenizer, tmp_path / "h", max_seq_length=512)
    assert info.value.param == "data.eval_dataset_id"


def test_eval_file_excludes_a_held_out_split():
    from trinity_core.errors import SpecError
    from trinity_core.spec import parse_spec

    for data in ({"path": "t.jsonl", "eval_path": "e.jsonl", "eval_fraction": 0.1},
                 {"path": "t.jsonl", "eval_dataset_id": "ds-1", "eval_min_rows": 2},
                 {"path": "t.jsonl", "eval_path": "e.jsonl", "eval_dataset_id": "ds-1"}):
        with pytest.raises(SpecError, match="eval_"):
            parse_spec({"data": data})
    spec = parse_spec({"data": {"dataset_id": "ds-1", "eval_dataset_id": "ds-2", "eval_fraction": 0}})
    assert parse_spec(spec.model_dump(mode="json")).data == spec.data  # the stored spec parses again
