"""bench/gpu_timeline.py (a benchmark tool): the GPU's idle gaps in a torch.profiler trace, put down to the host
operator that launched the next kernel. A hand-made trace with known gaps: one the host was late for, one after a
host sync, one under the minimum width."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu_timeline.py"


def _tool():
    spec = importlib.util.spec_from_file_location("gpu_timeline", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _x(cat, name, ts, dur, tid=1, corr=None):
    event = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": {}}
    if corr is not None:
        event["args"]["correlation"] = corr
    return event


def test_gaps_are_put_down_to_the_launching_operator(tmp_path):
    events = [
        _x("cpu_op", "Optimizer.step#AdamW8bit.step", 0, 1000),  # outermost on thread 1
        _x("cpu_op", "aten::add_", 100, 20),
        _x("cpu_op", "bitsandbytes::optimizer_update_8bit_blockwise", 300, 50),
        _x("cuda_runtime", "cudaLaunchKernel", 105, 5, corr=1),
        _x("cuda_driver", "cuLaunchKernelEx", 320, 5, corr=2),  # a Triton launch
        _x("cuda_runtime", "cudaDeviceSynchronize", 500, 100),
        _x("cuda_runtime", "cudaLaunchKernel", 610, 5, corr=3),
        _x("cuda_runtime", "cudaLaunchKernel", 612, 1, corr=4),
        _x("kernel", "k1", 110, 40, tid=7, corr=1),  # busy 110-150
        _x("kernel", "k2", 330, 100, tid=7, corr=2),  # gap 150-330 (180 us): launched at 320, late
        _x("kernel", "k3", 620, 10, tid=7, corr=3),  # gap 430-620 (190 us), a sync ran inside it
        _x("kernel", "k4", 632, 8, tid=7, corr=4),  # gap 630-632 (2 us): under the minimum
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    text = _tool().report(_tool().load(path), min_gap_us=5)
    first = text.splitlines()[0]
    assert "GPU span 0.5 ms" in first and "busy 0.2 ms" in first and "idle 0.4 ms" in first
    assert "2 gaps of >= 5 us hold 0.4 ms, 0.2 ms of them while the next kernel was not launched yet" in first
    assert "     0.18      1  bitsandbytes::optimizer_update_8bit_blockwise" in text
    assert "     0.19      1  host sync" in text
    assert "     0.18  Optimizer.step#AdamW8bit.step" in text


def test_streams_overlap_and_exposed_copies(tmp_path):
    def k(cat, name, ts, dur, stream):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": stream, "args": {"stream": stream}}

    events = [
        k("kernel", "compute1", 0, 100, 7),
        k("kernel", "compute2", 150, 100, 7),
        k("gpu_memcpy", "Memcpy DtoH", 50, 80, 20),  # 50-130: 50-100 under compute1, 100-130 exposed
        k("gpu_memcpy", "Memcpy HtoD", 240, 30, 20),  # 240-270: 240-250 under compute2, 250-270 exposed
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    tool = _tool()
    text = tool.report(tool.load(path))
    assert "     0.20      0.00  stream 7" in text
    assert "     0.11      0.11  stream 20" in text
    assert "two or more streams at once: 0.06 ms; memcpy 0.11 ms, of it with no kernel running: 0.05 ms" in text
    out = tmp_path / "small.json.gz"
    tool.compact(path, out)
    assert tool.report(tool.load(out)) == text
