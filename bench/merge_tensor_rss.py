"""Peak RSS of merging ONE projection (Gemma-3-12B gate/up shape 15360x3840, r 64 DoRA) as merge.py does it.

    python bench/merge_tensor_rss.py roundtrip float32|bfloat16   # 16-bit base, NF4 round trip in that dtype
    python bench/merge_tensor_rss.py prequantized                 # packed NF4 base, dequantised

Prints the bytes per element the merge adds over its input tensor (VmHWM reset via /proc/self/clear_refs);
trinity_core.export.resources.MERGE_BYTES_PER_ELEMENT comes from it.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from trinity_core.export.merge import Delta, Quant, nf4_roundtrip, dequantize_prequantized
import bitsandbytes.functional as bnbf

def hwm():
    for l in Path("/proc/self/status").read_text().splitlines():
        if l.startswith("VmHWM:"): return int(l.split()[1]) * 1024
def reset():
    Path("/proc/self/clear_refs").write_text("5")

out, inp, r = 15360, 3840, 64
mode = sys.argv[1]
g = torch.Generator().manual_seed(0)
d = Delta(torch.randn(r, inp, generator=g) * 0.02, torch.randn(out, r, generator=g) * 0.002, 4.0,
          0.45 + 0.05 * torch.rand(out, generator=g))
if mode == "prequantized":
    w = torch.randn(out, inp, generator=g, dtype=torch.bfloat16) * 0.02
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    stats = {k.removeprefix("weight."): v for k, v in state.as_dict(packed=True).items()}
    del w
else:
    w = (torch.randn(out, inp, generator=g) * 0.02).to(getattr(torch, sys.argv[2]))
reset(); base = hwm()
if mode == "prequantized":
    t = dequantize_prequantized(packed, stats)
else:
    t = nf4_roundtrip(w, Quant(dtype=sys.argv[2]))
t = d.apply(t)
t = t.to(torch.bfloat16)
peak = hwm()
n = out * inp
print(json.dumps({"mode": mode, "dtype": sys.argv[2] if len(sys.argv) > 2 else "stored",
                  "numel": n, "base_rss_gib": round(base / 2**30, 3), "peak_rss_gib": round(peak / 2**30, 3),
                  "added_bytes_per_element": round((peak - base) / n, 2)}))
