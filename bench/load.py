"""GET /jobs/{id} latency at N concurrent clients against a running API (benchmark, not a test).

Starts its own uvicorn (SQLite in a temp dir, Redis DB 14 unless --broker, reaper off, a queue
nobody consumes), creates --jobs jobs, then has --clients httpx async clients GET random job ids
for --seconds; prints p50/p90/p99/max and throughput. Loopback only.

    OMP_NUM_THREADS=1 python bench/load.py --clients 100 --seconds 30
    python bench/load.py --url http://127.0.0.1:8000 --key trn_...   # an already running API
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
ERROR_KINDS: dict[str, int] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_api(tmp: Path, broker: str, workers: int) -> tuple[subprocess.Popen, str, str, dict]:
    queue = f"bench.{secrets.token_hex(3)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRINITY_")}
    env.update({"PYTHONPATH": str(ROOT), "TRINITY_DATA_DIR": str(tmp / "data"), "TRINITY_BROKER_URL": broker,
                "TRINITY_GPU_QUEUES": queue, "TRINITY_REAPER_ENABLED": "false", "OMP_NUM_THREADS": "1",
                "TRINITY_MODEL_DIRS": str(tmp), "HF_HUB_OFFLINE": "1"})
    # POST /jobs checks that the model is there before it queues anything: a tiny local one
    subprocess.run([sys.executable, "-m", "cli", "tiny-model", str(tmp / "model")], env=env, cwd=ROOT,
                   capture_output=True, text=True, check=True)
    key = subprocess.run([sys.executable, "-m", "cli", "keys", "create", "--tenant", "bench"], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.strip()
    port = free_port()
    log = open(tmp / "api.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port",
                             str(port), "--workers", str(workers), "--log-level", "warning"],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base)
    return proc, base, key, env | {"queue": queue, "model": str(tmp / "model")}


def wait_healthy(base: str, log: Path | None = None, tries: int = 120) -> None:
    """Until GET {base}/health answers 200 (~0.5 s between tries); then, with ``log``, exit with the
    server's log if it never did."""
    for _ in range(tries):
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    if log is not None:
        raise SystemExit(log.read_text())


def make_jobs(base: str, key: str, n: int, model: str) -> list[str]:
    h = {"Authorization": f"Bearer {key}"}
    rows = "\n".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(12)) + "\n"
    ds = httpx.post(f"{base}/datasets", headers=h, files={"file": ("t.jsonl", rows.encode())}, timeout=60).json()["id"]
    body = {"model": {"name_or_path": model, "max_seq_length": 128}, "lora": {"r": 8, "alpha": 16},
            "train": {"max_steps": 3}, "export": {"merge": False, "gguf": False, "evaluate": False},
            "data": {"dataset_id": ds}}
    with httpx.Client(base_url=base, headers=h, timeout=60) as c:
        ids = []
        for _ in range(n):
            r = c.post("/jobs", json=body)
            if r.status_code != 201:
                raise SystemExit(f"POST /jobs answered {r.status_code}: {r.text[:500]}")
            ids.append(r.json()["id"])
        return ids


async def hammer(base: str, key: str, ids: list[str], clients: int, seconds: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    kinds = ERROR_KINDS
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.monotonic() < stop:
            t = time.perf_counter()
            try:
                r = await http.get(f"/jobs/{random.choice(ids)}")
                ok = r.status_code == 200
            except httpx.HTTPError as error:
                ok = False
                kinds[type(error).__name__] = kinds.get(type(error).__name__, 0) + 1
            else:
                if not ok:
                    kinds[str(r.status_code)] = kinds.get(str(r.status_code), 0) + 1
            if ok:
                latencies.append(time.perf_counter() - t)
            else:
                errors += 1

    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                 limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return latencies, errors


def pct(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=1000)[int(p * 10) - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--uvicorn-workers", type=int, default=1)
    ap.add_argument("--broker", default="redis://127.0.0.1:6379/14")
    ap.add_argument("--url")
    ap.add_argument("--key")
    ap.add_argument("--model", help="with --url: a model that API accepts for the jobs (default: a tiny local one)")
    args = ap.parse_args()
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            base, key, env = args.url, args.key, {"model": args.model}
        else:
            proc, base, key, env = start_api(Path(tmp), args.broker, args.uvicorn_workers)
        try:
            ids = make_jobs(base, key, args.jobs, env["model"])
            asyncio.run(hammer(base, key, ids, min(args.clients, 10), 2))  # warm up
            lat, errors = asyncio.run(hammer(base, key, ids, args.clients, args.seconds))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
                if not args.url:
                    import redis

                    redis.Redis.from_url(args.broker).delete(env["queue"])
    ms = [x * 1000 for x in lat] or [float("nan")]
    out = {"clients": args.clients, "seconds": args.seconds, "uvicorn_workers": args.uvicorn_workers,
           "requests": len(ms), "errors": errors, "req_per_s": round(len(ms) / args.seconds, 1),
           "p50_ms": round(pct(ms, 50), 1), "p90_ms": round(pct(ms, 90), 1), "p99_ms": round(pct(ms, 99), 1),
           "max_ms": round(max(ms), 1), "error_kinds": ERROR_KINDS, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
           "python": platform.python_version()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
