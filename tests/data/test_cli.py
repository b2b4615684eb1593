"""`trinity validate`, `trinity data prepare`, `trinity data inspect`, run in-process."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from cli.data import add_parsers
from tests.data.cases import rows_for, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def trinity(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="trinity")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture
def bad_file(tmp_path):
    rows = rows_for("medical", 4) + [{"question": "q"}, rows_for("medical", 1)[0]]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with open(path, "a") as f:
        f.write('{"question": "cut\n')
    return path


def test_validate_exit_codes_and_human_report(tmp_path, bad_file, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", rows_for("medical"))
    assert trinity("validate", good) == 0
    out = capsys.readouterr().out
    assert "question -> instruction (auto), answer -> output (auto)" in out and out.rstrip().endswith("OK")
    assert trinity("validate", bad_file) == 1
    out = capsys.readouterr().out
    assert "5       answer                   missing field" in out
    assert "6       -                        exact duplicate of line 1" in out
    assert "7       -                        invalid JSON" in out
    assert "FAILED: 7 lines, 4 valid; 3 error(s)" in out


def test_validate_a_spec_reports_every_problem_with_a_did_you_mean(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("model:\n  max_seq_length: 8\nlora:\n  rr: 8\ntrain:\n  learning_rat: 0.001\n")
    assert trinity("validate", spec) == 1
    out = capsys.readouterr().out
    assert "unsupported file type" not in out
    assert "  lora.rr                  unknown field; did you mean lora.r?" in out
    assert "  train.learning_rat       unknown field; did you mean train.learning_rate?" in out
    assert "  model.max_seq_length     " in out and "FAILED: 3 problem(s) in the job spec" in out
    assert trinity("validate", ROOT / "examples" / "tiny.yaml") == 0
    assert capsys.readouterr().out.rstrip().endswith("OK")


def test_validate_tells_a_json_spec_from_a_json_dataset(tmp_path, capsys):
    (tmp_path / "spec.json").write_text(json.dumps({"lora": {"rr": 8}, "train": {"max_steps": 2}}))
    assert trinity("validate", tmp_path / "spec.json", "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "spec" and report["errors"] == [
        {"loc": "lora.rr", "msg": "unknown field; did you mean lora.r?", "did_you_mean": "lora.r"}]
    (tmp_path / "rows.json").write_text(json.dumps({"data": rows_for("medical", 3)}))  # "data" holds a list: rows
    assert trinity("validate", tmp_path / "rows.json", "--json") == 0
    assert json.loads(capsys.readouterr().out)["stats"]["rows"] == 3
    (tmp_path / "spec.txt").write_text("lora:\n  r: 8\n")  # any other name is a dataset, unless --spec
    assert trinity("validate", tmp_path / "spec.txt") == 1 and "unsupported file type" in capsys.readouterr().err
    assert trinity("validate", "--spec", tmp_path / "spec.txt") == 0


def test_validate_json_and_mapping(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "Why?", "a": "Because."}])
    assert trinity("validate", path, "--json") == 1  # q/a are not names it guesses
    assert {e["field"] for e in json.loads(capsys.readouterr().out)["errors"]} == {"instruction", "output"}
    assert trinity("validate", path, "--json", "--map", "q=instruction", "--map", "a=output") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["mapping"] == {"q": "instruction", "a": "output"}
    with pytest.raises(SystemExit) as info:
        trinity("validate", path, "--map", "q")
    assert info.value.code == 2


def test_validate_with_tokenizer(tmp_path, tokenizer_dir, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", rows_for("code"))
    assert trinity("validate", path, "--tokenizer", tokenizer_dir, "--max-seq-length", "30") == 1
    out = capsys.readouterr().out
    assert "length      tokens: p50" in out and "max_seq_length 30: 12 too long" in out


def test_prepare_writes_canonical_jsonl_report_and_shows_the_loss_mask(tmp_path, tokenizer_dir, capsys):
    src = write_jsonl(tmp_path / "story.jsonl", rows_for("creative"))
    out = tmp_path / "data" / "dataset.jsonl"
    assert trinity("data", "prepare", src, "-o", out, "--tokenizer", tokenizer_dir, "--examples", "2") == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and rows[0]["messages"][1] == {"role": "assistant", "content": rows_for("creative", 1)[0]["story"]}
    report = json.loads((tmp_path / "data" / "dataset.report.json").read_text())
    assert report["ok"] and report["stats"]["output"] == str(out) and report["stats"]["length"]["unit"] == "tokens"
    assert printed.count("--- line ") == 2
    assert "model\n[[Lighthouse 0 blinked all night. In the morning, the fog finally lifted.<end_of_turn>]]" in printed
    assert "\x1b[" not in printed  # plain text


def test_prepare_refuses_bad_rows_unless_dropping(tmp_path, bad_file, capsys):
    out = tmp_path / "out.jsonl"
    assert trinity("data", "prepare", bad_file, "-o", out) == 1
    assert not out.exists() and (tmp_path / "out.report.json").exists()
    assert "--drop-invalid" in capsys.readouterr().out
    assert trinity("data", "prepare", bad_file, "-o", out, "--drop-invalid") == 0
    assert len(out.read_text().splitlines()) == 4
    assert json.loads((tmp_path / "out.report.json").read_text())["error_counts"] == {
        "duplicate": 1, "invalid_json": 1, "missing_field": 1}


def test_prepare_from_a_save_to_disk_dir_with_split(tmp_path, capsys):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows_for("openai", 3)),
                          "val": datasets.Dataset.from_list(rows_for("openai", 5)[3:])}).save_to_disk(tmp_path / "dd")
    out = tmp_path / "val.jsonl"
    assert trinity("data", "prepare", tmp_path / "dd", "--split", "val", "-o", out) == 0
    assert len(out.read_text().splitlines()) == 2
    assert "pass --tokenizer DIR to see the chat template" in capsys.readouterr().out


def test_inspect_writes_nothing(tmp_path, capsys):
    src = write_jsonl(tmp_path / "chat.jsonl", rows_for("chat"))
    assert trinity("data", "inspect", src) == 0
    out = capsys.readouterr().out
    assert "conversations format" in out and "assistant: Hello user 0!" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]
    assert trinity("data", "inspect", src, "--json") == 0
    assert json.loads(capsys.readouterr().out)["stats"]["rows"] == 12


def test_bad_source_is_a_clear_error(tmp_path, capsys):
    assert trinity("data", "prepare", tmp_path / "nope" / "x.jsonl", "-o", tmp_path / "o.jsonl") == 1
    assert "neither an existing file or directory nor a hub dataset id" in capsys.readouterr().err
    assert trinity("validate", tmp_path / "missing.jsonl") == 1
    assert "dataset file not found" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_mapping_writes_no_data_even_when_dropping(tmp_path, capsys):
    src = write_jsonl(tmp_path / "med.jsonl", rows_for("medical"))
    out = tmp_path / "o.jsonl"
    assert trinity("data", "prepare", src, "-o", out, "--map", "answr=output", "--drop-invalid") == 1
    assert not out.exists()
    assert "'answr' is not a field of the data" in capsys.readouterr().out
