"""GET /jobs/{id} beside GET /health under `ab`, and 100 clients polling once a second (benchmark,
not a test; issue 20 goal 4).

Starts its own uvicorn (SQLite in a temp dir, Redis DB 14, reaper and webhook sender off, a queue
nobody consumes), creates --jobs queued jobs, then in one run:

1. ``ab -c 100 -n N`` (Apache Bench, C: not the bottleneck) on GET /jobs/{id} with the Bearer key,
   then the same on GET /health (the trivial endpoint, for the ratio);
2. 100 httpx clients in a separate process, each GETting a random job once a second (paced, not
   closed-loop): p50/p99/max latency.

``--pin`` runs the server on CPU 1 and ab on CPU 0 (``taskset``): the server then has one core, the
load tool the other. Without it both share the machine's cores.

    python bench/api_load.py --workers 2 [--ab-keepalive] [--pin] [--baseline]

``--baseline`` runs uvicorn as before issue 20 (``--loop asyncio --http h11``: uvloop and httptools
were not installed) and ``--root`` another checkout's code (``git worktree add /tmp/base <commit>``),
for the before/after comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import free_port, make_jobs, pct  # noqa: E402  (bench/load.py: the job bodies)

ROOT = Path(__file__).resolve().parents[1]


def start_api(tmp: Path, *, workers: int, baseline: bool, pin: bool, extra_env: dict | None = None,
              server: list[str] | None = None, root: Path = ROOT):
    """uvicorn serving ``root``'s code (another checkout for a before/after); ``server``: the command
    that takes uvicorn's arguments (default ``python -m uvicorn``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRINITY_")}
    env.update({"PYTHONPATH": str(root), "TRINITY_DATA_DIR": str(tmp / "data"),
                "TRINITY_BROKER_URL": "redis://127.0.0.1:6379/14", "TRINITY_GPU_QUEUES": f"bench.{os.getpid()}",
                "TRINITY_REAPER_ENABLED": "false", "TRINITY_WEBHOOKS_ENABLED": "false", "OMP_NUM_THREADS": "1",
                "TRINITY_MODEL_DIRS": str(tmp), "HF_HUB_OFFLINE": "1", **(extra_env or {})})
    subprocess.run([sys.executable, "-m", "cli", "tiny-model", str(tmp / "model")], env=env, cwd=root,
                   capture_output=True, text=True, check=True)
    key = subprocess.run([sys.executable, "-m", "cli", "keys", "create", "--tenant", "bench"], env=env, cwd=root,
                         capture_output=True, text=True, check=True).stdout.strip()
    port = free_port()
    cmd = (server or [sys.executable, "-m", "uvicorn"]) + [
        "api.main:app", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
        "--log-level", "warning", "--no-access-log"]
    if baseline:
        cmd += ["--loop", "asyncio", "--http", "h11"]
    if pin:
        cmd = ["taskset", "-c", "1", *cmd]
    log = open(tmp / "api.log", "wb")
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        raise SystemExit((tmp / "api.log").read_text())
    return proc, base, key, {"model": str(tmp / "model"), "queue": env["TRINITY_GPU_QUEUES"], "env": env}


def ab(url: str, key: str | None, *, n: int, c: int, keepalive: bool, pin: bool) -> dict:
    cmd = ["ab", "-q", "-n", str(n), "-c", str(c)] + (["-k"] if keepalive else [])
    if key:
        cmd += ["-H", f"Authorization: Bearer {key}"]
    cmd = (["taskset", "-c", "0"] if pin else []) + cmd + [url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    print(f"$ {' '.join(cmd).replace(key or '@@', 'trn_…')}\n{out}", flush=True)
    field = lambda pattern: float(re.search(pattern, out).group(1))  # noqa: E731
    return {"req_per_s": field(r"Requests per second:\s+([\d.]+)"), "p50_ms": field(r"\n\s+50%\s+(\d+)"),
            "p99_ms": field(r"\n\s+99%\s+(\d+)"), "max_ms": field(r"\n\s+100%\s+(\d+)"),
            "failed": field(r"Failed requests:\s+(\d+)"), "non_2xx": (field(r"Non-2xx responses:\s+(\d+)")
                                                                    if "Non-2xx" in out else 0)}


async def paced(base: str, key: str, ids: list[str], clients: int, seconds: float, warmup: float = 2.0) -> dict:
    """Each client GETs a random job once a second, starting at staggered offsets; the first
    ``warmup`` seconds (connections opening) are not recorded. One httpx client with a pool of
    ``clients`` kept-alive connections: building an httpx client costs milliseconds of CPU (its
    SSL context), which 100 of them would spend inside the measurement."""
    latencies, errors = [], 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient, offset: float, begin: float) -> None:
        nonlocal errors
        for i in range(int(seconds + warmup)):
            await asyncio.sleep(max(0.0, begin + offset + i - time.monotonic()))
            t = time.perf_counter()
            r = await http.get(f"/jobs/{random.choice(ids)}")
            if r.status_code != 200:
                errors += 1
            elif i >= warmup:
                latencies.append((time.perf_counter() - t) * 1000)

    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30,
                                 limits=limits) as http:
        begin = time.monotonic() + 0.1
        await asyncio.gather(*(client(http, i / clients, begin) for i in range(clients)))
    return {"clients": clients, "seconds": seconds, "requests": len(latencies), "errors": errors,
            "p50_ms": round(pct(latencies, 50), 2), "p99_ms": round(pct(latencies, 99), 2),
            "max_ms": round(max(latencies), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--poll-seconds", type=float, default=20)
    ap.add_argument("--ab-keepalive", action="store_true", help="ab -k (HTTP keep-alive)")
    ap.add_argument("--pin", action="store_true", help="server on CPU 1, ab on CPU 0")
    ap.add_argument("--baseline", action="store_true", help="uvicorn --loop asyncio --http h11 (as before)")
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout whose API runs (before/after)")
    args = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {platform.node()} {os.cpu_count()} CPUs "
          f"{platform.processor() or platform.machine()} python {platform.python_version()}; "
          f"load average before: {os.getloadavg()}\n# args: {vars(args)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        proc, base, key, env = start_api(Path(tmp), workers=args.workers, baseline=args.baseline, pin=args.pin,
                                           root=args.root)
        try:
            ids = make_jobs(base, key, args.jobs, env["model"])
            ab(f"{base}/jobs/{ids[0]}", key, n=500, c=10, keepalive=args.ab_keepalive, pin=args.pin)  # warm up
            job = ab(f"{base}/jobs/{ids[0]}", key, n=args.requests, c=args.concurrency,
                     keepalive=args.ab_keepalive, pin=args.pin)
            health = ab(f"{base}/health", None, n=args.requests, c=args.concurrency,
                        keepalive=args.ab_keepalive, pin=args.pin)
            polling = subprocess.run(  # a separate process: the paced clients measure, they do not load
                (["taskset", "-c", "0"] if args.pin else [])
                + [sys.executable, __file__, "--_paced", base, key, ",".join(ids), str(args.poll_seconds)],
                capture_output=True, text=True, check=True).stdout
        finally:
            proc.terminate()
            proc.wait(10)
            import redis

            redis.Redis.from_url("redis://127.0.0.1:6379/14").delete(env["queue"])
    out = {"get_job": job, "health": health, "ratio_job_to_health": round(job["req_per_s"] / health["req_per_s"], 3),
           "polling_100_clients_1_per_s": json.loads(polling), "uvicorn_workers": args.workers,
           "root": str(args.root), "keepalive": args.ab_keepalive, "pinned": args.pin, "baseline_server": args.baseline,
           "load_average_after": os.getloadavg()}
    print(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_paced":
        _, _, base, key, ids, seconds = sys.argv
        print(json.dumps(asyncio.run(paced(base, key, ids.split(","), 100, float(seconds)))))
    else:
        main()
