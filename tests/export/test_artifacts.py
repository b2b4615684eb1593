"""Atomic writes (a file is complete under its final name or absent) and the artifacts manifest."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil

import pytest

from trinity_core import artifacts
from trinity_core.artifacts import (
    atomic_dir,
    atomic_file,
    atomic_write_bytes,
    atomic_write_json,
    build_manifest,
    read_json,
    sha256_file,
    write_manifest,
)
from trinity_core.errors import ArtifactError


def _leftovers(d):
    return sorted(p.name for p in d.iterdir() if ".tmp-" in p.name)


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "result.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2})
    assert read_json(path) == {"a": 2}
    assert read_json(tmp_path / "missing.json") is None
    assert _leftovers(path.parent) == []


def test_disk_full_keeps_the_old_file_and_removes_the_temp(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    atomic_write_json(path, {"old": True})
    monkeypatch.setattr(artifacts.os, "fsync", _disk_full)
    with pytest.raises(ArtifactError, match="disk full while writing .*report.json") as e:
        atomic_write_bytes(path, b"x" * 1000)
    assert e.value.code == "artifact_write_failed" and e.value.details["errno"] == "ENOSPC"
    monkeypatch.undo()
    assert read_json(path) == {"old": True}
    assert _leftovers(tmp_path) == []


def test_atomic_file_on_error_leaves_nothing(tmp_path):
    path = tmp_path / "model-f16.gguf"
    with pytest.raises(ArtifactError, match="disk full"), atomic_file(path) as tmp:
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert not path.exists() and _leftovers(tmp_path) == []
    with pytest.raises(RuntimeError), atomic_file(path):
        raise RuntimeError("converter crashed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    target = tmp_path / "merged"
    with atomic_dir(target) as d:
        (d / "a.txt").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as d:
        (d / "a.txt").write_text("2")
        raise RuntimeError("merge failed")
    assert (target / "a.txt").read_text() == "1" and _leftovers(tmp_path) == []
    with atomic_dir(target) as d:
        (d / "b.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_merge_on_a_full_disk_is_an_artifact_error(workdir, sharded_base, tmp_path, monkeypatch):
    from trinity_core.export import shards
    from trinity_core.export.merge import merge_adapter

    written = []
    real_write = shards.SafetensorsWriter.write

    def write_until_full(self, name, tensor):
        written.append(name)
        if len(written) == 30:  # somewhere in the third shard
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, name, tensor)

    monkeypatch.setattr(shards.SafetensorsWriter, "write", write_until_full)
    with pytest.raises(ArtifactError, match="disk full while writing .*merged"):
        merge_adapter(workdir / "adapter", tmp_path / "merged", base_model=sharded_base)
    assert len(written) == 30
    assert list(tmp_path.iterdir()) == []  # neither merged/ nor its temp directory


def test_sha256_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(os.urandom(3 << 20))
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_lists_complete_files_only(exported, report, workdir, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(workdir, wd)
    (wd / "result.json").write_text("{}")
    (wd / "gguf" / ".model-q5_k_m.gguf.tmp-123").write_bytes(b"half")  # a conversion in progress
    (wd / "merged.tmp-abc").mkdir()
    (wd / "merged.tmp-abc" / "model.safetensors").write_bytes(b"half")
    rows = build_manifest(wd)
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names))
    expected = {"adapter_model.safetensors": "adapter", "adapter_config.json": "adapter",
                "model-f16.gguf": "gguf", "model-q4_k_m.gguf": "gguf", "model-q8_0.gguf": "gguf",
                "Modelfile": "modelfile", "report.md": "report", "report.json": "report", "loss.png": "plot",
                "result.json": "result", "merged/config.json": "merged",
                "merged/model.safetensors.index.json": "merged", "merged/tokenizer_config.json": "merged",
                "merged/model-00001-of-00008.safetensors": "merged",
                "merged/trinity_merge.json": "merged"}
    by_name = {r["name"]: r for r in rows}
    for name, kind in expected.items():
        assert by_name[name]["kind"] == kind, name
    assert not [n for n in names if "tmp" in n]
    # text-only base: no projector; no training here, so no TensorBoard files (tests/core/test_training.py)
    assert {r["kind"] for r in rows} == set(artifacts.KINDS) - {"mmproj", "tensorboard"}
    for r in rows:
        path = wd / r["path"]
        assert r["size"] == path.stat().st_size and r["sha256"] == sha256_file(path)
    write_manifest(wd)
    assert json.loads((wd / "artifacts.json").read_text()) == rows
    assert artifacts.find_artifact(wd, "Modelfile") == wd / "gguf" / "Modelfile"
    with pytest.raises(ArtifactError, match="duplicate"):
        write_manifest(wd, rows + rows[:1])
