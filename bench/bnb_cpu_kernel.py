"""bitsandbytes' CPU 4-bit dequantisation against its own pure-torch reference (which reads the
packed stream flat, like the CUDA kernel): the whole weight through the native kernel (2-D shape),
and the same through a 1-D (flat) call, for widths that are and are not multiples of 64.

    python bench/bnb_cpu_kernel.py      # raw output: bench/results/2026-11-28-cpu-bnb_cpu_kernel.txt
"""
import torch
import bitsandbytes.functional as F
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from bitsandbytes.backends.utils import _get_4bit_code

print('torch cpu capability', torch.backends.cpu.get_cpu_capability(), '| avx512_bf16', F.has_avx512bf16())
torch.manual_seed(0)
for rows, width in [(12,96),(12,128),(8,160),(6,3840)]:
  for nested in (False, True):
    w = torch.randn(rows, width)
    q, st = F.quantize_4bit(w, blocksize=64, quant_type='nf4', compress_statistics=nested)
    full = F.dequantize_4bit(q, st)
    absmax = st.absmax
    if st.nested: absmax = F.dequantize_blockwise(st.absmax, st.state2).float() + st.offset
    code = _get_4bit_code('nf4', q.device)
    ref = _dequantize_4bit_compute(q.view(torch.uint8).reshape(-1), absmax.float(), code, 64, [rows,width], torch.float32)
    # flat call through the registered op
    flat = torch.ops.bitsandbytes.dequantize_4bit.default(q.view(torch.uint8).reshape(-1,1), absmax.float().contiguous(), 64, 'nf4', [rows*width], torch.float32).reshape(rows,width)
    print(rows, width, nested, 'full-vs-torchref', (full-ref).abs().max().item(), 'flat-vs-ref', (flat-ref).abs().max().item(), 'quant err', (ref-w).abs().max().item())
