"""Read and write safetensors files one tensor at a time, so a merge holds one tensor, not a shard.

``safetensors``' own API does not fit a streaming merge: ``safe_open`` memory-maps the file, so
every page a merge touches counts in its RSS until the file is closed (a whole input shard), and
``save_file`` needs every tensor of an output shard in memory at once. The format is simple (an
8-byte little-endian header length, a JSON header of ``{name: {dtype, shape, data_offsets}}``,
then the raw bytes), so this module reads tensors with plain ``readinto`` calls and writes a file
whose header is known in advance (names, dtypes and shapes) while its tensors arrive one by one.
Files written here are read back by ``safetensors.safe_open`` in the tests.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def torch_dtype(code: str) -> Any:
    import torch

    return getattr(torch, DTYPES[code])


def dtype_code(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    return next(code for code, n in DTYPES.items() if n == name)


class SafetensorsReader:
    """``header`` (name -> {dtype, shape, data_offsets}) and ``get(name)`` with plain file reads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = open(self.path, "rb")  # noqa: SIM115  (closed by close()/__exit__)
        (n,) = struct.unpack("<Q", self._f.read(8))
        header = json.loads(self._f.read(n))
        self.metadata = header.pop("__metadata__", None) or {}
        self.header: dict[str, dict[str, Any]] = header
        self._start = 8 + n

    def keys(self) -> list[str]:
        return sorted(self.header, key=lambda k: self.header[k]["data_offsets"][0])  # file order

    def get(self, name: str) -> Any:
        import torch

        info = self.header[name]
        begin, end = info["data_offsets"]
        dtype = torch_dtype(info["dtype"])
        if end == begin:
            return torch.empty(info["shape"], dtype=dtype)
        buf = bytearray(end - begin)
        self._f.seek(self._start + begin)
        if self._f.readinto(buf) != len(buf):
            raise OSError(f"{self.path}: truncated tensor {name}")
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SafetensorsWriter:
    """Write a safetensors file whose tensors are declared up front: ``plan`` is a list of
    ``(name, dtype, shape)`` in file order; then ``write(name, tensor)`` in that order."""

    def __init__(self, path: str | Path, plan: list[tuple[str, Any, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self._order = []
        for name, dtype, shape in plan:
            size = _numel(shape) * _itemsize(dtype)
            header[name] = {"dtype": dtype_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._order.append((name, dtype, tuple(shape)))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.data_size = offset
        self._f = open(path, "wb")  # noqa: SIM115
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: Any) -> None:
        import torch

        want, dtype, shape = self._order[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (want, dtype, shape):
            raise ValueError(f"expected {want} {dtype} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        if tensor.numel():
            self._f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        """Check every planned tensor was written, fsync, close."""
        try:
            if self._next != len(self._order):
                raise ValueError(f"{len(self._order) - self._next} planned tensors were not written")
            self._f.flush()
            os.fsync(self._f.fileno())
        finally:
            self._f.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()  # the caller removes the half-written file (merge: its temp directory)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: Any) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()
