"""``trinity::nf4_dequantize`` (trinity_core.train.nf4_dequant, what the compiled decoder layers launch for
their frozen projections) against bitsandbytes' own dequantisation, value for value: its Triton kernel in
Triton's interpreter on CPU tensors, and its torch fallback; plain and double-quantised scales (more than one
256-scale block of them), a last block cut short, an odd count of values (half a byte), 64- and 128-value
blocks, and each dtype the layers compute in. tests/gpu/test_nf4_matmul_cuda.py repeats it compiled."""

from __future__ import annotations

import pytest
import torch

from trinity_core import nf4
from trinity_core.train import nf4_dequant

# (out, in): whole blocks; a last block cut short (63 values, odd: the last byte half used); 600 scales
# (3 second-level blocks of 256); more than one program's bytes (BLOCK_BYTES), cut short
SHAPES = [(32, 128), (9, 7), (300, 128), (3, 1000)]


def _weight(shape, nested: bool, blocksize: int, dtype: torch.dtype):
    """A bitsandbytes Params4bit quantised on CPU (its quant_state's dtype: ``dtype``)."""
    import bitsandbytes as bnb

    data = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0] * shape[1])) * 0.05
    weight = bnb.nn.Params4bit(data.to(dtype), requires_grad=False, blocksize=blocksize, compress_statistics=nested,
                               quant_type="nf4").to("cpu")  # quantises
    assert weight.quant_state.nested == nested and weight.quant_state.dtype == dtype
    return weight, data


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double_quant"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_dequantisation_is_bitsandbytes(shape, nested, blocksize, dtype, path, monkeypatch):
    if path == "kernel":
        pytest.importorskip("triton", reason="the kernel runs in Triton's interpreter")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    nf4.read_rows_flat_on_cpu()
    weight, data = _weight(shape, nested, blocksize, dtype)
    got = nf4_dequant.dequantize(weight, dtype)
    assert got.shape == shape and got.dtype == dtype
    want = nf4.dequantize(weight.data, weight.quant_state, torch.float32)  # exact: fp32 products
    if path == "kernel" and dtype == torch.bfloat16:  # the interpreter (numpy) converts fp32 to bf16 by cutting
        want = (want.view(torch.int32) & -65536).view(torch.float32)  # the low 16 bits: that, then exactly
    assert torch.equal(got, want.to(dtype))  # a conversion (CUDA's rounds: tests/gpu/test_nf4_matmul_cuda.py)
    # and what the weight was quantised from, to NF4's precision (its largest step is ~0.28 of the block's absmax)
    assert (got.float() - data).abs().max() <= 0.2 * data.abs().max()


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_a_tail_is_written_beside_the_weight(shape, path, monkeypatch):
    """``dequantize(..., tail)``: ``[W | tail]``, W's columns the same values as without a tail (the kernel writes
    them a row stride apart), the tail's copied (fast_dora/lora_in_gemm's ``[W | s·B]``)."""
    if path == "kernel":
        pytest.importorskip("triton", reason="the kernel runs in Triton's interpreter")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    nf4.read_rows_flat_on_cpu()
    weight, _ = _weight(shape, True, 64, torch.float32)
    tail = torch.randn(shape[0], 5, generator=torch.Generator().manual_seed(1))
    got = nf4_dequant.dequantize(weight, torch.float32, tail)
    assert got.shape == (shape[0], shape[1] + 5)
    assert torch.equal(got[:, :shape[1]], nf4_dequant.dequantize(weight, torch.float32))
    assert torch.equal(got[:, shape[1]:], tail)


def test_covers_plain_frozen_nf4_layers_only():
    import bitsandbytes as bnb

    def layer(**kwargs):
        args = {"bias": False, "compute_dtype": torch.bfloat16, "quant_type": "nf4"} | kwargs
        made = bnb.nn.Linear4bit(128, 32, **args)
        made.weight = bnb.nn.Params4bit(torch.randn(32, 128).to(torch.bfloat16), requires_grad=False,
                                        quant_type=args["quant_type"])
        return made.to("cpu")

    assert nf4_dequant.covers(layer(), torch.bfloat16)
    assert not nf4_dequant.covers(layer(), torch.float16), "another dtype than the quantised one"
    assert not nf4_dequant.covers(layer(bias=True), torch.bfloat16)
    assert not nf4_dequant.covers(layer(quant_type="fp4"), torch.bfloat16)
    assert not nf4_dequant.covers(torch.nn.Linear(4, 4), torch.float32)


def test_traces_into_one_graph():
    """Dynamo traces it whole, a bitsandbytes ``Params4bit`` and its nested state included: no graph break
    and no bitsandbytes op in the graph."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    nf4.read_rows_flat_on_cpu()
    weight, _ = _weight((48, 128), True, 64, torch.float32)
    torch._dynamo.reset()
    counters.clear()
    seen: list[str] = []
    counted = CompileCounterWithBackend("aot_eager")

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return counted(gm, example_inputs)

    got = torch.compile(lambda w: nf4_dequant.dequantize(w, torch.float32), backend=backend)(weight)
    assert torch.equal(got, nf4.dequantize(weight.data, weight.quant_state, torch.float32))
    assert counted.frame_count == 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert "trinity.nf4_dequantize" in seen and not [t for t in seen if "bitsandbytes" in t], seen
