"""The streaming safetensors reader/writer agree with the safetensors library both ways."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trinity_core.export.shards import SafetensorsReader, SafetensorsWriter

TENSORS = {
    "a.weight": torch.randn(33, 7).to(torch.bfloat16),
    "b.weight": torch.randn(5, 3),
    "c.packed": torch.randint(0, 255, (17, 1), dtype=torch.uint8),
    "d.empty": torch.empty(0, 4),
    "e.half": torch.randn(3).half(),
    "f.index": torch.arange(6, dtype=torch.int64).reshape(2, 3),
}


def test_written_files_load_with_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    with SafetensorsWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in TENSORS.items()]) as w:
        for k, v in TENSORS.items():
            w.write(k, v)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(TENSORS)
        for k, v in TENSORS.items():
            assert torch.equal(f.get_tensor(k), v), k
    assert w.data_size == sum(v.numel() * v.element_size() for v in TENSORS.values())


def test_reader_reads_safetensors_files(tmp_path):
    path = tmp_path / "y.safetensors"
    save_file(TENSORS, str(path), metadata={"format": "pt"})
    with SafetensorsReader(path) as r:
        assert set(r.keys()) == set(TENSORS) and r.metadata == {"format": "pt"}
        for k, v in TENSORS.items():
            assert torch.equal(r.get(k), v), k


def test_writer_refuses_what_was_not_planned(tmp_path):
    with pytest.raises(ValueError, match="expected a.weight"):
        with SafetensorsWriter(tmp_path / "z.safetensors", [("a.weight", torch.float32, (2, 2))]) as w:
            w.write("a.weight", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="1 planned tensors were not written"):
        with SafetensorsWriter(tmp_path / "z.safetensors", [("a.weight", torch.float32, (2, 2))]):
            pass
