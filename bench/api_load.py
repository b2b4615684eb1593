"""GET /jobs/{id} beside a trivial endpoint under `ab` or `wrk`, and 100 clients polling once a
second (benchmark, not a test; issue 20 goal 4).

Starts its own uvicorn (SQLite in a temp dir, Redis DB 14, reaper and webhook sender off, a queue
nobody consumes), creates --jobs queued jobs, then in one run:

1. ``--rounds`` times, back to back: ``ab -c 100 -n N`` (Apache Bench) or ``wrk -t1 -c 100 -d S``
   (``--tool wrk``; both C, not the bottleneck) on GET /jobs/{id} with the Bearer key, then on the
   trivial endpoint ``--trivial`` (default GET /livez: a constant answer through the same FastAPI
   app, for the ratio; skipped when the server has none, e.g. an older checkout), then on GET
   /health (which reads the database). Each measurement records the load average just before it
   (the machine is shared), and the CPU time the server's processes and the load tool spent
   during it: the server's CPU per request moves much less than requests/s when other users
   load the machine. The summary gives each endpoint's median over the rounds.
2. 100 httpx clients in a separate process, each GETting a random job once a second (paced, not
   closed-loop): p50/p99/max latency.
3. In another process on the server's SQLite file (this checkout's code only): microseconds per
   body of GET /jobs/{id} when the job's row is unchanged (``api/poll.py``'s memo answers, as in
   the load runs, which poll one job) and when it changed since the last poll (the body rebuilt),
   and the read alone: what a poll costs when every poll finds its job changed.

``--pin`` runs the server on CPU 1 and ab on CPU 0 (``taskset``): the server then has one core, the
load tool the other. Without it both share the machine's cores.

    python bench/api_load.py --workers 2 [--ab-keepalive] [--tool wrk] [--rounds 3] [--pin] [--baseline]

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
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import free_port, make_jobs, pct, wait_healthy  # noqa: E402  (bench/load.py: the job bodies)

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
    wait_healthy(base, tmp / "api.log")
    return proc, base, key, {"model": str(tmp / "model"), "queue": env["TRINITY_GPU_QUEUES"], "env": env}


def run_load_tool(cmd: list[str], url: str, key: str | None, pin: bool) -> tuple[str, tuple]:
    """Run ab or wrk (``cmd`` without the key header and URL; on CPU 0 with ``pin``) and print its
    output with the load average before it and the command, the key masked: (output, load)."""
    if key:
        cmd = cmd + ["-H", f"Authorization: Bearer {key}"]
    cmd = (["taskset", "-c", "0"] if pin else []) + cmd + [url]
    load = os.getloadavg()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    print(f"# load average before: {load}\n$ {' '.join(cmd).replace(key or '@@', 'trn_…')}\n{out}", flush=True)
    return out, load


def ab(url: str, key: str | None, *, n: int, c: int, keepalive: bool, pin: bool) -> dict:
    out, load = run_load_tool(["ab", "-q", "-n", str(n), "-c", str(c)] + (["-k"] if keepalive else []),
                              url, key, pin)
    field = lambda pattern: float(re.search(pattern, out).group(1))  # noqa: E731
    return {"requests": field(r"Complete requests:\s+(\d+)"),
            "req_per_s": field(r"Requests per second:\s+([\d.]+)"), "p50_ms": field(r"\n\s+50%\s+(\d+)"),
            "p99_ms": field(r"\n\s+99%\s+(\d+)"), "max_ms": field(r"\n\s+100%\s+(\d+)"),
            "failed": field(r"Failed requests:\s+(\d+)"), "non_2xx": (field(r"Non-2xx responses:\s+(\d+)")
                                                                    if "Non-2xx" in out else 0),
            "load_average_before": load}


WRK_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def wrk(url: str, key: str | None, *, seconds: float, c: int, pin: bool) -> dict:
    """wrk with one thread (as ab: one core's worth of load tool), keep-alive always."""
    out, load = run_load_tool(["wrk", "-t1", f"-c{c}", f"-d{seconds:g}s", "--latency"], url, key, pin)

    def latency(p: int) -> float:
        value, unit = re.search(rf"\n\s+{p}%\s+([\d.]+)(us|ms|s|m)\b", out).groups()
        return round(float(value) * WRK_UNITS_MS[unit], 3)

    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "req_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": latency(50), "p99_ms": latency(99), "non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": sum(map(int, socket_errors.groups())) if socket_errors else 0,
            "load_average_before": load}


def server_cpu_s(session: int) -> float:
    """CPU seconds (user + system) spent so far by the processes of the server's session: uvicorn
    and its workers (started with ``start_new_session``, so the session id is uvicorn's pid)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[3]) == session:  # fields after the name: state ppid pgrp session … utime(11) stime(12)
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def tool_cpu_s() -> float:
    """CPU seconds spent by this script's finished children (ab, wrk: each is waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(args: argparse.Namespace, url: str, key: str | None, server: int) -> dict:
    """One load-tool run, with the CPU time the server and the tool spent during it: the server's
    CPU per request moves much less than requests/s when other users load the machine."""
    cpu, tool, wall = server_cpu_s(server), tool_cpu_s(), time.monotonic()
    if args.tool == "wrk":
        result = wrk(url, key, seconds=args.seconds, c=args.concurrency, pin=args.pin)
    else:
        result = ab(url, key, n=args.requests, c=args.concurrency, keepalive=args.ab_keepalive, pin=args.pin)
    used = server_cpu_s(server) - cpu
    return result | {"wall_s": round(time.monotonic() - wall, 2), "server_cpu_s": round(used, 2),
                     "server_cpu_us_per_request": round(used * 1e6 / max(result["requests"], 1)),
                     "tool_cpu_s": round(tool_cpu_s() - tool, 2)}


def rounds(args: argparse.Namespace, base: str, key: str, job_id: str, server: int) -> dict[str, list[dict]]:
    """Each endpoint ``args.rounds`` times, interleaved, so a burst of load from the machine's other
    users falls on all of them rather than on one."""
    endpoints = {"get_job": (f"{base}/jobs/{job_id}", key)}
    if httpx.get(f"{base}{args.trivial}", timeout=5).status_code == 200:
        endpoints["trivial"] = (f"{base}{args.trivial}", None)
    else:
        print(f"# {args.trivial} does not answer 200 on this server: no trivial endpoint measured", flush=True)
    endpoints["health"] = (f"{base}/health", None)
    results: dict[str, list[dict]] = {name: [] for name in endpoints}
    for _ in range(args.rounds):
        for name, (url, auth) in endpoints.items():
            results[name].append(measure(args, url, auth, server))
    return results


def median_of(runs: list[dict]) -> dict:
    return {field: statistics.median(r[field] for r in runs)
            for field in ("req_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_request", "tool_cpu_s")}


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


def memo_cost(job_id: str, tenant: str, n: int = 2000) -> dict:
    """Microseconds per call on the loop reader (the server's own path), median of 3 × ``n``."""
    from api import poll
    from trinity_service import crud
    from trinity_service.db import loop_reader

    reader = loop_reader()

    def per_call(call) -> float:  # noqa: ANN001
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(n):
                call()
            times.append((time.perf_counter() - start) / n * 1e6)
        return round(statistics.median(times), 1)

    def changed() -> None:
        poll._bodies.clear()  # as if the row had changed since the last poll
        poll.public_json(reader, tenant, job_id)

    return {"read_only_us": per_call(lambda: crud.job_row_values(connection=reader, tenant=tenant, job_id=job_id)),
            "unchanged_row_us": per_call(lambda: poll.public_json(reader, tenant, job_id)),
            "changed_row_us": per_call(changed), "calls": 3 * n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--poll-seconds", type=float, default=20)
    ap.add_argument("--ab-keepalive", action="store_true", help="ab -k (HTTP keep-alive)")
    ap.add_argument("--tool", choices=("ab", "wrk"), default="ab", help="load tool (wrk keeps connections alive)")
    ap.add_argument("--seconds", type=float, default=10, help="wrk: seconds per measurement")
    ap.add_argument("--rounds", type=int, default=1, help="measurements per endpoint, interleaved")
    ap.add_argument("--trivial", default="/livez", help="the trivial endpoint of the same server, for the ratio")
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
            runs = rounds(args, base, key, ids[0], proc.pid)
            cost = None
            if (args.root / "api" / "poll.py").exists():  # this code: not in older checkouts
                cost = json.loads(subprocess.run([sys.executable, __file__, "--_memo_cost", ids[0]], env=env["env"],
                                                 cwd=args.root, capture_output=True, text=True, check=True).stdout)
            polling = subprocess.run(  # a separate process: the paced clients measure, they do not load
                (["taskset", "-c", "0"] if args.pin else [])
                + [sys.executable, __file__, "--_paced", base, key, ",".join(ids), str(args.poll_seconds)],
                capture_output=True, text=True, check=True).stdout
        finally:
            proc.terminate()
            proc.wait(10)
            import redis

            redis.Redis.from_url("redis://127.0.0.1:6379/14").delete(env["queue"])
    medians = {name: median_of(r) for name, r in runs.items()}
    out = {"tool": args.tool, "rounds": args.rounds, "median": medians, "runs": runs,
           "ratio_job_to_trivial": (round(medians["get_job"]["req_per_s"] / medians["trivial"]["req_per_s"], 3)
                                    if "trivial" in medians else None),
           "ratio_job_to_health": round(medians["get_job"]["req_per_s"] / medians["health"]["req_per_s"], 3),
           "polling_100_clients_1_per_s": json.loads(polling), "poll_body_cost_in_process": cost,
           "uvicorn_workers": args.workers,
           "root": str(args.root), "keepalive": args.tool == "wrk" or args.ab_keepalive, "pinned": args.pin,
           "baseline_server": args.baseline, "load_average_after": os.getloadavg()}
    print(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_paced":
        _, _, base, key, ids, seconds = sys.argv
        print(json.dumps(asyncio.run(paced(base, key, ids.split(","), 100, float(seconds)))))
    elif len(sys.argv) > 1 and sys.argv[1] == "--_memo_cost":
        print(json.dumps(memo_cost(sys.argv[2], tenant="bench")))
    else:
        main()
