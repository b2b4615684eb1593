"""NF4 dequantisation in graph operations (``nf4.dequantize_in_graph``, what the compiled decoder layers trace
for their frozen projections) against bitsandbytes' own dequantisation, value for value: plain and
double-quantised scales (more than one 256-scale block of them), a last block cut short, an odd count of values
(half a byte), 64- and 128-value blocks, and each dtype the layers compute in."""

from __future__ import annotations

import pytest
import torch

from trinity_core import nf4

# (out, in): whole blocks; a last block cut short (63 values, odd: the last byte half used); 600 scales
# (3 second-level blocks of 256); one row
SHAPES = [(32, 128), (9, 7), (300, 128), (1, 4096)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double_quant"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_in_graph_dequantisation_is_bitsandbytes(shape, nested, blocksize, dtype):
    import bitsandbytes.functional as bnbf

    nf4.read_rows_flat_on_cpu()
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0] * shape[1])) * 0.05
    packed, state = bnbf.quantize_4bit(weight.to(dtype), blocksize=blocksize, quant_type="nf4",
                                       compress_statistics=nested)
    assert state.nested == nested
    got = nf4.dequantize_in_graph(packed, state, dtype)
    assert got.shape == shape and got.dtype == dtype
    assert torch.equal(got, nf4.dequantize(packed, state, dtype))
    # and what the weight was quantised from, to NF4's precision (its largest step is ~0.28 of the block's absmax)
    assert (got.float() - weight).abs().max() <= 0.2 * weight.abs().max()


def test_in_graph_dequantisation_traces_into_one_graph():
    """Dynamo traces it whole, a bitsandbytes ``Params4bit`` and its nested state included: no graph break
    and no bitsandbytes op in the graph."""
    import bitsandbytes as bnb
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    layer = bnb.nn.Linear4bit(128, 48, bias=False, compute_dtype=torch.float32, compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(48, 128) * 0.05, requires_grad=False, compress_statistics=True)
    weight = layer.to("cpu").weight
    torch._dynamo.reset()
    counters.clear()
    seen: list[str] = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return counted(gm, example_inputs)

    counted = CompileCounterWithBackend("aot_eager")
    got = torch.compile(lambda w: nf4.dequantize_in_graph(w, w.quant_state, torch.float32), backend=backend)(weight)
    assert torch.equal(got, nf4.dequantize(weight.data, weight.quant_state, torch.float32))
    assert counted.frame_count == 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert seen and not [t for t in seen if "bitsandbytes" in t], seen
