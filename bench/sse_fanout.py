"""SSE fan-out: 500 followers on one API process, events committed by a separate writer process
(benchmark, not a test; issue 20 goal 4).

Starts its own uvicorn (one process, through ``bench/counted_api.py``: it counts every database
statement), creates --jobs jobs, opens --followers SSE streams spread over the jobs from
--client-procs client processes (httpx, asyncio), then a writer process commits --events events
(``crud.add_event``, round-robin over the jobs, every --interval s). Prints the commit → receipt
latency over every (follower, event) pair (p50/p99/max; the event's ``time`` is stamped just before
its commit), events missed, the server's thread count (max while streaming) and the statements it
ran while the events were written, per event.

    python bench/sse_fanout.py [--followers 500] [--root /tmp/base]   # --root: another checkout (before)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_load import ROOT, start_api  # noqa: E402
from load import make_jobs, pct  # noqa: E402


async def follow_all(base: str, key: str, jobs: list[str], n: int, until: float) -> dict:
    """n streams (round-robin over jobs) until ``until``; receipt latencies and events per stream."""
    latencies: list[float] = []
    counts = [0] * n
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    opened = 0

    async def one(http: httpx.AsyncClient, i: int) -> None:
        nonlocal opened
        url = f"/jobs/{jobs[i % len(jobs)]}/events/stream"
        try:
            async with http.stream("GET", url) as r:
                opened += 1
                async for line in r.aiter_lines():
                    if line.startswith("data: {\"seq\""):
                        event = json.loads(line[6:])
                        if event["type"] == "metrics":  # the writer's; the job's own events are replayed
                            latencies.append((time.time() - event["time"]) * 1000)
                            counts[i] += 1
        except (httpx.HTTPError, asyncio.CancelledError):
            pass

    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=None,
                                 limits=limits) as http:
        tasks = [asyncio.create_task(one(http, i)) for i in range(n)]
        await asyncio.sleep(max(0.0, until - time.time()))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"latencies": latencies, "counts": counts, "opened": opened}


def write_events(jobs: list[str], events: int, interval: float) -> None:
    """The writer process: commits events as a worker would (its own engine and notifications)."""
    from trinity_service import crud
    from trinity_service.db import session_scope

    for i in range(events):
        with session_scope() as session:
            crud.add_event(session=session, job_id=jobs[i % len(jobs)], type="metrics", message=f"step {i}",
                           data={"step": i})
        time.sleep(interval)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--followers", type=int, default=500)
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=5)
    ap.add_argument("--events", type=int, default=40)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout whose API runs (before/after)")
    args = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {platform.node()} {os.cpu_count()} CPUs python "
          f"{platform.python_version()}; load average before: {os.getloadavg()}\n# args: {vars(args)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        counter = Path(tmp) / "statements"
        proc, base, key, env = start_api(Path(tmp), workers=1, baseline=False, pin=False, root=args.root,
                                         server=[sys.executable, str(ROOT / "bench" / "counted_api.py"), str(counter)])
        try:
            jobs = make_jobs(base, key, args.jobs, env["model"])
            settle, write_s = 15.0, args.events * args.interval + 5
            until = time.time() + settle + write_s
            per = [args.followers // args.client_procs + (i < args.followers % args.client_procs)
                   for i in range(args.client_procs)]
            clients = [subprocess.Popen([sys.executable, __file__, "--_follow", base, key, ",".join(jobs), str(n),
                                         str(until)], stdout=subprocess.PIPE, text=True) for n in per]
            time.sleep(settle)  # every stream opened and replayed
            threads = []
            before = int(counter.read_text())
            writer = subprocess.Popen([sys.executable, __file__, "--_write", ",".join(jobs), str(args.events),
                                       str(args.interval)], env=env["env"], cwd=args.root)
            while writer.poll() is None:
                threads.append(int(next(line.split()[1] for line in open(f"/proc/{proc.pid}/status")
                                         if line.startswith("Threads:"))))
                time.sleep(0.25)
            time.sleep(2)  # the last event's delivery
            statements = int(counter.read_text()) - before
            results = [json.loads(c.communicate()[0]) for c in clients]
        finally:
            proc.terminate()
            proc.wait(10)
    lat = [x for r in results for x in r["latencies"]]
    counts = [c for r in results for c in r["counts"]]
    expected = _expected(args, per)
    out = {"followers": args.followers, "streams_opened": sum(r["opened"] for r in results), "jobs": args.jobs,
           "events": args.events, "deliveries": len(lat), "deliveries_expected": sum(expected),
           "followers_missing_events": sum(c < e for c, e in zip(counts, expected)),
           "latency_ms": {"p50": round(pct(lat, 50), 1), "p99": round(pct(lat, 99), 1), "max": round(max(lat), 1)}
           if lat else None,
           "server_threads_max": max(threads) if threads else None, "db_statements_during_writes": statements,
           "db_statements_per_event": round(statements / args.events, 1), "root": str(args.root),
           "load_average_after": os.getloadavg()}
    print(json.dumps(out))


def _expected(args: argparse.Namespace, per: list[int]) -> list[int]:
    """Events each follower should get, in the order the client processes report them."""
    out = []
    for n in per:
        out += [len(range(i % args.jobs, args.events, args.jobs)) for i in range(n)]
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_follow":
        _, _, base, key, jobs, n, until = sys.argv
        r = asyncio.run(follow_all(base, key, jobs.split(","), int(n), float(until)))
        print(json.dumps(r))
    elif len(sys.argv) > 1 and sys.argv[1] == "--_write":
        write_events(sys.argv[2].split(","), int(sys.argv[3]), float(sys.argv[4]))
    else:
        main()
