"""The published checkpoint's path end to end, measured per stage: run_job on a 12B-shaped
multimodal stand-in (pre-quantised 4-bit, SigLIP-sized vision tower) under an emulated T4.

    # on the GPU machine (device tool), wheels of ../shared/gpu/wheels.sh + llama.cpp carried:
    PYTHONPATH=.whl/site:.gpu-extra/site:. python bench/gpu_mm_job.py build /tmp/g12b --layers 24
    PYTHONPATH=.whl/site:.gpu-extra/site:. python bench/gpu_mm_job.py run /tmp/g12b /tmp/job $OUT/mm_job.json

``run`` emulates a T4 the way tests/gpu/test_unsloth.py does: fp16 requested (Gemma-3 then computes
in fp32), eager attention, and the process capped at 15.1 GiB minus the estimated memory of the
48 − L text layers the stand-in leaves out. While ``run_job`` runs, a sampler thread records per
stage (from the job's own status events): seconds, peak GPU memory allocated by this process
(torch.cuda.max_memory_allocated, reset at each stage), peak host RSS of the process tree (the
GGUF converter is a child process) and the disk the workdir holds at the stage's end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
T4_GIB = 15.1
EXPORT_STAGES = ("merge", "gguf")


def cgroup_report() -> dict | None:
    """When the process runs in a cgroup-v2 group with a memory limit (``--ram-limit``), the limit, the
    group's peak (anonymous + page cache charged to it) and its OOM-kill count: the proof that the
    run fitted, page cache pressure included."""
    try:
        rel = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1]
        base = Path("/sys/fs/cgroup") / rel.lstrip("/")
        read = lambda name: (base / name).read_text().strip() if (base / name).exists() else None  # noqa: E731
        events = dict(line.split() for line in (read("memory.events") or "").splitlines())
        return {"group": rel, "memory.max": read("memory.max"), "memory.peak": read("memory.peak"),
                "oom_kill": events.get("oom_kill")}
    except (OSError, IndexError, ValueError):
        return None


MEM_FIELDS = ("RssAnon", "RssFile", "RssShmem")


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in MEM_FIELDS:
                out[key] = int(value.split()[0]) * 1024
    return out


def tree_mem(pid: int) -> dict[str, int]:
    """Resident bytes of ``pid`` and all its descendants (from /proc), split the kernel's way:
    ``anon`` (heap, tensors: what must fit in RAM), ``file`` (pages of mmap'd files, e.g. the
    checkpoint or the f16 GGUF being read: clean, the kernel drops them under pressure), ``shmem``;
    ``rss`` is their sum, ``main_anon`` the job process's own anonymous part."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    total = {"anon": 0, "file": 0, "shmem": 0, "main_anon": 0}
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            mem = _status_kib(p)
        except OSError:
            continue
        total["anon"] += mem.get("RssAnon", 0)
        total["file"] += mem.get("RssFile", 0)
        total["shmem"] += mem.get("RssShmem", 0)
        if p == pid:
            total["main_anon"] = mem.get("RssAnon", 0)
        todo += children.get(p, [])
    total["rss"] = total["anon"] + total["file"] + total["shmem"]
    return total


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


class StageSampler:
    """Peak host RSS (sampled every 0.2 s) and peak GPU memory per stage."""

    def __init__(self, workdir: Path):
        import torch

        self.torch, self.workdir = torch, workdir
        self.stages: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.start("load", time.monotonic())
        self._thread.start()

    def start(self, name: str, now: float) -> None:
        if self.stages:
            self._close(now)
            # each stage's line as it ends: a job killed later (the kernel's OOM killer in a cgroup)
            # still leaves the peaks of the stages it finished in the log
            print("stage done " + json.dumps(self.stages[-1]), flush=True)
        if self.torch.cuda.is_available():
            self.torch.cuda.reset_peak_memory_stats()
        self.stages.append({"stage": name, "t0": now, "peak_rss_gib": 0.0, "peak_anon_gib": 0.0,
                            "peak_main_anon_gib": 0.0, "peak_file_gib": 0.0})

    def _close(self, now: float) -> None:
        stage = self.stages[-1]
        stage["seconds"] = round(now - stage.pop("t0"), 1)
        stage["peak_gpu_gib"] = (round(self.torch.cuda.max_memory_allocated() / GIB, 3)
                                 if self.torch.cuda.is_available() else None)
        stage["workdir_disk_gib"] = round(disk_bytes(self.workdir) / GIB, 3)

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            stage = self.stages[-1]
            mem = tree_mem(os.getpid())
            for key in ("rss", "anon", "main_anon", "file"):
                stage[f"peak_{key}_gib"] = max(stage[f"peak_{key}_gib"], round(mem[key] / GIB, 3))

    def finish(self) -> list[dict]:
        self._stop.set()
        self._thread.join()
        self._close(time.monotonic())
        return self.stages


def build(args: argparse.Namespace) -> None:
    from trinity_core.fixtures.tiny_multimodal import build_multimodal_model

    t0 = time.monotonic()
    shapes = {"12b": ("12b", "siglip-so400m"), "tiny": ("tiny", "tiny")}[args.shape]  # tiny: a CPU dry run
    out = build_multimodal_model(args.out, quantized=True, text_shape=shapes[0], vision_shape=shapes[1],
                                 num_hidden_layers=args.layers, max_shard_size="5GB")
    print(json.dumps({"built": str(out), "layers": args.layers, "seconds": round(time.monotonic() - t0, 1),
                      "disk_gib": round(disk_bytes(Path(out)) / GIB, 3)}))


def run(args: argparse.Namespace) -> None:
    os.environ.setdefault("UNSLOTH_COMPILE_DISABLE", "1")  # the backend's choice with DoRA
    if args.backend == "unsloth":
        import unsloth  # noqa: F401  (before transformers)
    import torch

    from trinity_core import model_config
    from trinity_core.train import memory
    from trinity_core.pipeline import run_job
    from trinity_core.spec import load_spec

    spec = load_spec(ROOT / "examples" / "tiny.yaml")
    spec.model.name_or_path, spec.model.backend = str(args.model), args.backend
    spec.model.compute_dtype, spec.model.attention = "float16", "eager"  # a T4: no bf16, no flex at head_dim 256
    spec.model.max_seq_length = args.seq
    spec.train.max_steps, spec.train.save_steps = args.steps, args.steps
    spec.lora.r, spec.lora.alpha = 64, 32  # the recipe's adapter on the recipe's targets
    spec.train.batch_size, spec.train.grad_accum = 1, 4  # the recipe's batch
    spec.ladder.preflight = False

    config = model_config.resolve(str(args.model)).data
    layers = config["text_config"]["num_hidden_layers"]
    full = json.loads(json.dumps(config))
    full["text_config"]["num_hidden_layers"] = 48
    est = {n: memory.estimate(cfg, spec, args.backend, bf16_supported=False).gib
           for n, cfg in (("here", config), ("full48", full))}
    cap = T4_GIB - (est["full48"] - est["here"])
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / GIB
        torch.cuda.set_per_process_memory_fraction(cap / total)

    workdir = Path(args.workdir)
    if not args.resume:
        shutil.rmtree(workdir, ignore_errors=True)
    events: list[dict] = []
    sampler = StageSampler(workdir)

    def on_event(event) -> None:
        e = event.to_dict() if hasattr(event, "to_dict") else dict(event)
        events.append(e)
        stage = (e.get("data") or {}).get("stage")
        if e.get("type") == "status" and stage:
            sampler.start(stage, time.monotonic())
        print(f"{time.strftime('%H:%M:%S')} {e.get('message')}", flush=True)

    t0 = time.monotonic()
    error = None
    try:
        result = run_job(spec, workdir, on_event)
    except Exception as e:  # report what ran, then fail
        error, result = f"{type(e).__name__}: {e}", None
    stages = sampler.finish()
    report = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "layers": layers, "cap_gib": round(cap, 3),
        "estimate_gib": {k: round(v, 3) for k, v in est.items()}, "seq": args.seq, "steps": args.steps,
        "backend": args.backend, "wall_s": round(time.monotonic() - t0, 1), "error": error,
        "stages": stages,
        "peak_rss_gib": max(s["peak_rss_gib"] for s in stages),
        "peak_anon_gib": max(s["peak_anon_gib"] for s in stages),
        "export_peak_rss_gib": max((s["peak_rss_gib"] for s in stages if s["stage"] in EXPORT_STAGES), default=None),
        "export_peak_anon_gib": max((s["peak_anon_gib"] for s in stages if s["stage"] in EXPORT_STAGES), default=None),
        "cgroup": cgroup_report(),
        "workdir_disk_gib": round(disk_bytes(workdir) / GIB, 3),
        "files": {str(p.relative_to(workdir)): p.stat().st_size for p in sorted(workdir.rglob("*"))
                  if p.is_file() and p.suffix in (".gguf", ".safetensors") and "checkpoints" not in p.parts},
    }
    if result is not None:
        report.update(attempts=result.attempts, loss=[h["loss"] for h in result.loss_history],
                      timings=result.timings, report={k: result.report.get(k) for k in ("held_out", "models", "merged_weights")})
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({k: report[k] for k in ("device", "layers", "cap_gib", "wall_s", "error", "peak_rss_gib",
                                             "peak_anon_gib", "export_peak_rss_gib", "export_peak_anon_gib",
                                             "workdir_disk_gib")}))
    for s in stages:
        print(json.dumps(s))
    if error:
        print(error)
        raise SystemExit(75 if error.startswith("GpuMemoryNotReleased") else 1)  # 75: go on in a fresh process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("out", type=Path)
    b.add_argument("--layers", type=int, default=24)
    b.add_argument("--shape", choices=["12b", "tiny"], default="12b")
    r = sub.add_parser("run")
    r.add_argument("model", type=Path)
    r.add_argument("workdir", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--backend", default="unsloth", choices=["unsloth", "peft"])
    r.add_argument("--seq", type=int, default=4096)
    r.add_argument("--steps", type=int, default=3)
    r.add_argument("--resume", action="store_true", help="keep the workdir: go on where a process stopped")
    args = parser.parse_args()
    {"build": build, "run": run}[args.cmd](args)


if __name__ == "__main__":
    main()
