"""Seconds, peak host RSS and disk of each export stage of a trained workdir, next to the estimate.

    python bench/export_resources.py WORKDIR [--base MODEL] [--stages merge,gguf_f16,quantize,mmproj,evaluate]
                                              [--quantizations q4_k_m] [--json OUT.json]

WORKDIR holds ``adapter/`` (and, from a job, ``spec.resolved.json``, ``data/``). ``--base``: the model
the adapter was trained on (default: the spec's ``model.name_or_path``). Each stage runs in a fresh
child process (``--child STAGE``) doing what ``export_all`` / ``evaluate_job`` do for it; this process
samples the child's whole process tree (the GGUF converter is a grandchild) every 0.1 s from /proc:
peak summed RSS, of which anonymous, and the free disk of WORKDIR's filesystem (the lowest free
value gives the stage's peak disk use, temp files included). ``os.wait4`` gives the largest single
process's VmHWM. Printed per stage with ``trinity_core.export.resources.estimate`` for the same spec.
A stage reuses the previous stages' outputs, so run them in order (the default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("merge", "gguf_f16", "quantize", "mmproj", "evaluate")
GIB = 2**30


def load_spec(workdir: Path, base: str | None, quantizations: list[str] | None):
    from trinity_core.spec import JobSpec

    saved = workdir / "spec.resolved.json"
    data = json.loads(saved.read_text())["spec"] if saved.is_file() else {}
    spec = JobSpec.model_validate(data) if data else JobSpec()
    if base:
        spec.model.name_or_path = base
    if quantizations is not None:
        spec.export.quantizations = quantizations
    return spec


def run_child(stage: str, workdir: Path, spec_json: str) -> None:
    """One stage, as the pipeline runs it."""
    from trinity_core.export import gguf
    from trinity_core.export.run import quant_of
    from trinity_core.export.merge import merge_adapter
    from trinity_core.spec import JobSpec

    spec = JobSpec.model_validate_json(spec_json)
    gdir = workdir / "gguf"
    gdir.mkdir(exist_ok=True)
    if stage == "merge":
        merge_adapter(workdir / "adapter", workdir / "merged", base_model=spec.model.name_or_path,
                      revision=spec.model.revision, merge_into=spec.export.merge_into,
                      original_model=spec.export.original_model, quant=quant_of(spec))
    elif stage == "gguf_f16":
        gguf.convert_to_gguf(workdir / "merged", gdir / gguf.gguf_name("f16"), model_name=spec.name)
    elif stage.startswith("quantize_"):
        q = stage.removeprefix("quantize_")
        gguf.quantize_gguf(gdir / gguf.gguf_name("f16"), gdir / gguf.gguf_name(q), q)
    elif stage == "mmproj":
        gguf.convert_to_gguf(workdir / "merged", gdir / gguf.MMPROJ_NAME, model_name=spec.name, mmproj=True)
    elif stage == "evaluate":
        from transformers import AutoTokenizer

        from trinity_core.evaluate.run import evaluate_job

        export = {"merge": True, "gguf": {q: f"gguf/{gguf.gguf_name(q)}" for q in ["f16", *spec.export.quantizations]
                                          if (gdir / gguf.gguf_name(q)).is_file()}}
        result = json.loads((workdir / "result.json").read_text()) if (workdir / "result.json").is_file() else {}
        tokenizer = AutoTokenizer.from_pretrained(spec.model.name_or_path, revision=spec.model.revision)
        evaluate_job(spec, workdir, export=export, tokenizer=tokenizer, loss_history=result.get("loss_history", []))


def tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def rss(pid: int) -> tuple[int, int]:
    """(RSS, anonymous RSS) of one process in bytes."""
    total = anon = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total = int(line.split()[1]) * 1024
            elif line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
    except OSError:
        pass
    return total, anon


def measure(stage: str, workdir: Path, spec_json: str) -> dict:
    peak = {"rss": 0, "anon": 0, "min_free": shutil.disk_usage(workdir).free}
    free_before = peak["min_free"]
    du_before = du(workdir)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, __file__, str(workdir), "--child", stage, "--spec-json", spec_json],
                            env=env)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            pids = tree(proc.pid)
            sizes = [rss(p) for p in pids]
            peak["rss"] = max(peak["rss"], sum(s[0] for s in sizes))
            peak["anon"] = max(peak["anon"], sum(s[1] for s in sizes))
            peak["min_free"] = min(peak["min_free"], shutil.disk_usage(workdir).free)
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    return {"stage": stage, "rc": proc.returncode, "seconds": round(time.monotonic() - t0, 1),
            "peak_tree_rss": peak["rss"], "peak_tree_anon": peak["anon"], "max_process_hwm": usage.ru_maxrss * 1024,
            "disk_written": du(workdir) - du_before, "peak_disk_use": free_before - peak["min_free"]}


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--base", help="model the adapter was trained on (default: the spec's)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--quantizations", help="comma-separated (default: the spec's)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec-json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(args.child, args.workdir, args.spec_json)
        return

    from trinity_core import model_config
    from trinity_core.export import resources

    quants = args.quantizations.split(",") if args.quantizations is not None else None
    spec = load_spec(args.workdir, args.base, quants)
    config = model_config.load(spec.model.name_or_path, spec.model.revision)
    data = model_config.resolve(spec.model.name_or_path, spec.model.revision).data
    est = resources.estimate(config, spec, dtype_bytes=resources.dtype_bytes(data), cuda=_cuda())
    stages = []
    for s in args.stages.split(","):
        if s == "quantize":
            stages += [f"quantize_{q}" for q in spec.export.quantizations if q != "f16"]
        elif s != "mmproj" or resources.vision_tensors(config):
            stages.append(s)
    print(f"# workdir {args.workdir}, base {spec.model.name_or_path}, quantizations {spec.export.quantizations}")
    print(f"# host: {os.cpu_count()} cpus, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"load {os.getloadavg()}")
    print(f"{'stage':<16}{'rc':>3}{'s':>8}{'tree RSS':>10}{'anon':>8}{'1 proc':>8}{'est RSS':>9}"
          f"{'disk':>9}{'est disk':>9}  (GiB)")
    rows = []
    for stage in stages:
        row = measure(stage, args.workdir, spec.model_dump_json())
        row["estimate_rss"] = est.ram.get(stage)
        disk_key = {"gguf_f16": "gguf_f16", "mmproj": "mmproj"}.get(stage, stage.replace("quantize_", "gguf_"))
        row["estimate_disk"] = est.disk.get(disk_key)
        rows.append(row)
        g = lambda v: f"{v / GIB:.2f}" if v is not None else "-"  # noqa: E731
        print(f"{stage:<16}{row['rc']:>3}{row['seconds']:>8}{g(row['peak_tree_rss']):>10}{g(row['peak_tree_anon']):>8}"
              f"{g(row['max_process_hwm']):>8}{g(row['estimate_rss']):>9}{g(row['disk_written']):>9}"
              f"{g(row['estimate_disk']):>9}", flush=True)
        if row["rc"] != 0:
            break
    print(json.dumps({"rows": rows, "estimate": est.to_dict()}))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "estimate": est.to_dict()}, indent=1))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
