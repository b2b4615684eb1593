"""A GPU-trained adapter through the CPU export: train on the lent GPU, export here.

    # on the GPU machine (device tool), with the wheels of ../shared/gpu/wheels.sh:
    PYTHONPATH=.whl/site:. python bench/gpu_tiny_job.py train $OUT
    # back here, on the fetched folder:
    python bench/gpu_tiny_job.py export /work/.device/N

``train`` builds the tiny Gemma-3 into OUT/tiny and runs ``run_job`` with the Unsloth backend
(QLoRA + rsLoRA + fast DoRA, export off) into OUT/job. ``export`` merges that adapter into the
same base (dequantised as the GPU quantised it), converts it to GGUF f16 and q4_k_m and asks
llama.cpp for a completion from the q4_k_m file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(out: Path) -> None:
    """``TRINITY_BENCH_COMPILED_LAYERS=0``: with ``RunOptions(compiled_layers=False)`` (the decoder layers eager;
    on by default since call 14, docs/BENCHMARKS.md "Goal 1, later on 2026-11-29"). ``TRINITY_BENCH_LORA=1``: the
    same job with LoRA (DoRA off), Unsloth imported by the backend, which chooses its compile mode itself
    (``backends/unsloth.trinity_layers_for``: Trinity's compiled layers on a bf16 GPU)."""
    import os

    lora = os.environ.get("TRINITY_BENCH_LORA") == "1"
    if not lora:
        os.environ.setdefault("UNSLOTH_COMPILE_DISABLE", "1")  # the backend's choice with DoRA
        import unsloth  # noqa: F401  (before transformers)

    import subprocess

    from trinity_core.options import RunOptions
    from trinity_core.spec import load_spec

    spec = load_spec(ROOT / "examples" / "tiny.yaml")
    spec.model.name_or_path = str(out / "tiny")
    subprocess.run([sys.executable, "-c", "import sys; from trinity_core.fixtures.tiny import build_tiny_model; "
                    "build_tiny_model(sys.argv[1])", spec.model.name_or_path], check=True)  # transformers elsewhere
    spec.model.backend = "unsloth"
    spec.train.max_steps = 20
    spec.lora.use_dora = not lora
    spec.export.merge = spec.export.gguf = spec.export.evaluate = False
    options = RunOptions(compiled_layers=os.environ.get("TRINITY_BENCH_COMPILED_LAYERS", "1") == "1")
    if lora:  # the backend decides Unsloth's compile mode and imports it, before anything imports transformers
        from trinity_core.train.backends.unsloth import UnslothBackend

        UnslothBackend(spec, options)
        print(f"UNSLOTH_COMPILE_DISABLE={os.environ.get('UNSLOTH_COMPILE_DISABLE')}", flush=True)
    from trinity_core.pipeline import run_job
    if os.environ.get("TRINITY_BENCH_REGION_PROBE") == "1":
        probe_cpu_tensors()
    result = run_job(spec, out / "job", options=options)
    (out / "spec.json").write_text(spec.model_dump_json(indent=1))
    import shutil
    import tarfile

    with tarfile.open(out / "tiny.tar", "w") as tar:  # one file: the device returns few files
        tar.add(out / "tiny", arcname="tiny")
    shutil.rmtree(out / "tiny")
    for name in ("checkpoints", "data"):
        shutil.rmtree(out / "job" / name, ignore_errors=True)
    print(json.dumps({"backend": result.backend, "attempts": result.attempts,
                      "loss": [h["loss"] for h in result.loss_history]}, default=str))


def probe_cpu_tensors() -> None:
    """Print every CPU tensor of the graphs inductor compiles (Dynamo's graph and the post-grad forward and
    backward), each with the end of its source stack: which work of a GPU job would take inductor's C++
    codegen."""
    import time

    import torch
    import torch._inductor.compile_fx as compile_fx_module
    from torch._inductor import config

    start = time.monotonic()

    def cpu_nodes(graph, where: str) -> None:
        shown = 0
        for node in graph.nodes:
            val = node.meta.get("val", node.meta.get("example_value"))
            vals = val if isinstance(val, (tuple, list)) else [val]
            devices = {v.device.type for v in vals if isinstance(v, torch.Tensor)}
            if "cpu" in devices and shown < 12:
                shown += 1
                stack = (node.meta.get("stack_trace") or "").strip().splitlines()[-4:]
                print(f"[probe] {where}: cpu {node.op} {node.format_node()[:200]}", *stack, sep="\n    ",
                      flush=True)
        print(f"[probe] {where}: {shown} cpu nodes shown, at {time.monotonic() - start:.1f} s", flush=True)

    original = compile_fx_module.compile_fx

    def compile_fx(gm, example_inputs, *args, **kwargs):
        cpu_inputs = [i for i, t in enumerate(example_inputs) if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
        print(f"[probe] dynamo graph: {len(example_inputs)} inputs, cpu ones at {cpu_inputs}", flush=True)
        cpu_nodes(gm.graph, "dynamo graph")
        return original(gm, example_inputs, *args, **kwargs)

    compile_fx_module.compile_fx = compile_fx
    config.post_grad_custom_pre_pass = lambda graph: cpu_nodes(graph, "post-grad graph")


def export(fetched: Path) -> None:
    import shutil

    from llama_cpp import Llama

    from trinity_core.export.run import export_all
    from trinity_core.spec import JobSpec

    import tarfile

    spec = JobSpec.model_validate_json((fetched / "spec.json").read_text())
    base = Path("/tmp/gpu_tiny_base")
    shutil.rmtree(base, ignore_errors=True)
    with tarfile.open(fetched / "tiny.tar") as tar:
        tar.extractall(base, filter="data")
    spec.export.merge = spec.export.gguf = True
    spec.export.evaluate = False
    result_json = json.loads((fetched / "job" / "result.json").read_text())
    work = Path("/tmp/gpu_tiny_export")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(fetched / "job" / "adapter", work / "adapter")
    t0 = time.monotonic()
    out = export_all(spec, work, emit=lambda *a, **k: None, base_model=str(base / "tiny"),
                     compute_dtype=result_json["backend"]["compute_dtype"])
    q4 = work / out["gguf"]["q4_k_m"]
    llm = Llama(model_path=str(q4), n_ctx=256, verbose=False)
    text = llm("The", max_tokens=12, temperature=0.0)["choices"][0]["text"]
    print(json.dumps({"trained_on": result_json["backend"], "gguf": out["gguf"], "q4_k_m_bytes": q4.stat().st_size,
                      "export_s": round(time.monotonic() - t0, 1), "llama_cpp_completion": text}, default=str))


if __name__ == "__main__":
    {"train": train, "export": export}[sys.argv[1]](Path(sys.argv[2]))
