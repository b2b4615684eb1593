"""Sources: JSON / JSONL / Parquet / CSV files, save_to_disk directories and hub ids (offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.data.cases import rows_for, write_jsonl
from trinity_core.data.prepare import validate_file, validate_source
from trinity_core.errors import DatasetError
from trinity_core.data.sources import looks_like_hub_id, open_source, resolve_cli_source

ROOT = Path(__file__).resolve().parents[2]


def _rows(path, **kw):
    return list(open_source(path=path, **kw).rows())


def test_json_array_object_with_list_and_jsonl_in_a_json_file(tmp_path):
    rows = rows_for("medical", 3)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "o.json").write_text(json.dumps({"version": 2, "data": rows}))
    write_jsonl(tmp_path / "l.json", rows)  # many .json files are really JSONL
    for name in ("a.json", "o.json", "l.json"):
        assert [r for _, r, _ in _rows(tmp_path / name)] == rows
        assert validate_file(tmp_path / name).ok
    (tmp_path / "two.json").write_text(json.dumps({"a": rows, "b": rows}))
    with pytest.raises(DatasetError, match="one list of rows"):
        _rows(tmp_path / "two.json")


def test_unreadable_json_file_is_one_error_with_its_line(tmp_path):
    (tmp_path / "bad.json").write_text('[\n{"question": "q", "answer": "a"},\n{"question": "q2", \n]')
    report = validate_file(tmp_path / "bad.json")
    assert [(e["row"], e["kind"]) for e in report.errors] == [(4, "invalid_json")]


def test_broken_jsonl_line_is_reported_at_the_column_json_names(tmp_path):
    cut = json.dumps(rows_for("medical", 1)[0])[:-1] + ","  # the line ends where a field should start
    for ending in ("\n", "\r\n"):
        (tmp_path / "d.jsonl").write_text(json.dumps(rows_for("medical", 1)[0]) + "\n" + cut + ending)
        with pytest.raises(json.JSONDecodeError) as python:
            json.loads(cut)
        [error] = validate_file(tmp_path / "d.jsonl").errors
        assert python.value.colno > 1 and error["row"] == 2
        assert error["message"].startswith(f"invalid JSON at column {python.value.colno}: "), error


def test_parquet_and_csv(tmp_path):
    import datasets

    rows = rows_for("creative", 4)
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "d.parquet")
    assert [r for _, r, _ in _rows(tmp_path / "d.parquet")] == rows
    csv_text = 'prompt,story\n"Write, please","Once\nupon a time."\nShort,Tale\n'
    (tmp_path / "d.csv").write_text(csv_text)
    assert [r for _, r, _ in _rows(tmp_path / "d.csv")] == [
        {"prompt": "Write, please", "story": "Once\nupon a time."}, {"prompt": "Short", "story": "Tale"}]
    assert validate_file(tmp_path / "d.csv").ok


def test_csv_problems_are_numbered_by_record(tmp_path):
    (tmp_path / "d.csv").write_bytes(b"question,answer\nq1,a1\nq2,caf\xe9\nq3,a3,extra\nq4\nq5,a5\n")
    report = validate_file(tmp_path / "d.csv")
    assert [(e["row"], e["field"], e["kind"]) for e in report.errors] == [
        (2, None, "invalid_utf8"), (3, None, "invalid_csv"), (4, "answer", "missing_field")]
    assert report.stats["valid_rows"] == 2


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    train, test = rows_for("reasoning", 5), rows_for("reasoning", 7)[5:]
    datasets.Dataset.from_list(train).save_to_disk(tmp_path / "ds")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "test": datasets.Dataset.from_list(test)}).save_to_disk(tmp_path / "dd")  # fmt: skip
    assert [r for _, r, _ in _rows(tmp_path / "ds")] == train
    assert [r for _, r, _ in _rows(tmp_path / "dd", split="test")] == test
    report = validate_file(tmp_path / "dd")
    assert report.ok and report.stats["rows"] == 5 and report.mapping == {"problem": "instruction",
                                                                          "solution": "output"}  # fmt: skip
    with pytest.raises(DatasetError, match="no split 'validation'; splits are train, test"):
        open_source(path=tmp_path / "dd", split="validation")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetError, match="not one written by datasets.save_to_disk"):
        open_source(path=tmp_path / "plain")


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        open_source(path=tmp_path / "nope.jsonl")
    (tmp_path / "notes.txt").write_text("just text")
    with pytest.raises(DatasetError, match="unsupported file type '.txt'"):
        open_source(path=tmp_path / "notes.txt")


def test_cli_source_resolution(tmp_path):
    assert looks_like_hub_id("yahma/alpaca-cleaned") and looks_like_hub_id("squad")
    for text in ("data/train.jsonl", "a/b/c", "../x", "has space/x", "train.parquet"):
        assert not looks_like_hub_id(text), text
    path = write_jsonl(tmp_path / "d.jsonl", rows_for("medical", 2))
    assert resolve_cli_source(str(path)).kind == "jsonl"
    with pytest.raises(DatasetError, match="neither an existing file or directory nor a hub dataset id"):
        resolve_cli_source(str(tmp_path / "missing" / "train.jsonl"))


# The hub path runs in a subprocess because datasets reads HF_HOME / HF_HUB_OFFLINE at import.
# The cache is filled exactly as a hub download fills it: the Parquet builder with the repo's id and
# name and a commit hash, under HF_HOME/datasets/acme___medqa/default/0.0.0/<hash>. Then
# trinity's open_source(hub="acme/medqa") calls datasets.load_dataset("acme/medqa", ...), which
# (offline) finds no hub and falls back to that cache. Not exercised: a real download.
HUB_SCRIPT = textwrap.dedent("""
    import json, sys
    import datasets
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet, ParquetConfig
    from trinity_core.data.prepare import validate_source
    from trinity_core.errors import TrinityError
    from trinity_core.data.sources import open_source

    class Hub(Parquet):
        BUILDER_CONFIGS = [ParquetConfig(name="default", data_files=DataFilesDict.from_patterns(
            {"train": [sys.argv[1]]}))]

    Hub(cache_dir=str(datasets.config.HF_DATASETS_CACHE), dataset_name="medqa", repo_id="acme/medqa",
        hash="0123456789abcdef0123456789abcdef01234567").download_and_prepare()
    out = {"report": validate_source(open_source(hub="acme/medqa")).to_dict()}
    for name, kw in (("missing", {"hub": "acme/missing"}), ("split", {"hub": "acme/medqa", "split": "test"})):
        try:
            open_source(**kw)
        except TrinityError as e:
            out[name] = {**e.to_dict(), "retryable": e.retryable}
    print("RESULT" + json.dumps(out))
""")


def _run(script: str, *args: str, **env: str) -> dict:
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", **env}
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def test_hub_dataset_loads_offline_from_a_warm_cache(tmp_path):
    import datasets

    datasets.Dataset.from_list(rows_for("medical", 5)).to_parquet(tmp_path / "train.parquet")
    out = _run(HUB_SCRIPT, str(tmp_path / "train.parquet"), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    report = out["report"]
    assert report["ok"] and report["source"] == "acme/medqa" and report["stats"]["rows"] == 5
    assert report["mapping"] == {"question": "instruction", "answer": "output"}
    missing = out["missing"]
    assert missing["code"] == "hub_download_failed" and missing["retryable"]
    assert "acme/missing" in missing["message"] and "HF_HUB_OFFLINE" in missing["message"]
    assert missing["details"] == {"dataset": "acme/missing", "reason": "network"}
    assert out["split"]["code"] == "invalid_dataset" and 'Unknown split "test"' in out["split"]["message"]


# A local HTTP server answers like the hub does for an unknown and a gated dataset (status code +
# X-Error-Code header), so huggingface_hub raises its real RepositoryNotFound / GatedRepo errors.
FAKE_HUB_SCRIPT = textwrap.dedent("""
    import http.server, json, os, threading

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            gated = "gated" in self.path
            self.send_response(403 if gated else 404)
            self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
        do_GET = do_HEAD
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{server.server_port}"
    from trinity_core.errors import HubDownloadError
    from trinity_core.data.sources import open_source
    out = {}
    for name in ("acme/no-such-set", "acme/gated-set"):
        try:
            open_source(hub=name)
        except HubDownloadError as e:
            out[name] = e.to_dict()
    print("RESULT" + json.dumps(out))
""")


def test_hub_not_found_and_gated_become_hub_download_errors(tmp_path):
    out = _run(FAKE_HUB_SCRIPT, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0")
    assert out["acme/no-such-set"]["details"] == {"dataset": "acme/no-such-set", "reason": "not_found"}
    assert "acme/no-such-set" in out["acme/no-such-set"]["message"]
    assert out["acme/gated-set"]["details"] == {"dataset": "acme/gated-set", "reason": "gated"}
    assert "HF_TOKEN" in out["acme/gated-set"]["message"]


def test_validate_source_on_an_open_source(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows_for("openai", 3))
    assert validate_source(open_source(path=path)).format == "messages"
