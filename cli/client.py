"""Client commands against a running service (httpx): ``submit``, ``status``, ``logs``, ``cancel``,
``download``. The service is ``TRINITY_URL`` (default http://127.0.0.1:8000), the key
``TRINITY_API_KEY`` (``trinity keys create --tenant NAME`` prints one).

Exit codes, for scripts:

====  =====================================================================================
0     done; for a job's outcome (``submit --wait``, ``status ID``, ``logs -f``): succeeded,
      or still queued/running where the command does not wait
1     the job failed
2     usage: bad arguments, no ``TRINITY_API_KEY``, unreadable spec or data file
3     the job was cancelled
4     the spec is invalid (``submit`` checks it before uploading anything), or the service
      refused the request (its error is printed: invalid spec or dataset, not found, bad
      key...) or could not be reached; a dataset ``submit`` uploaded for a refused job is deleted
5     a download did not match the manifest's sha256 (the partial file is deleted)
====  =====================================================================================

Progress bars and tables are drawn only on a terminal; otherwise every update is a plain line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED, EXIT_REFUSED, EXIT_CHECKSUM = 0, 1, 2, 3, 4, 5
TERMINAL = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}
DEFAULT_URL = "http://127.0.0.1:8000"
REMOTE_DATA_FIELDS = ("path", "hub", "config", "split", "revision")  # replaced by the uploaded dataset_id


class ClientError(Exception):
    def __init__(self, message: str, code: int = EXIT_REFUSED):
        super().__init__(message)
        self.code = code


def add_parsers(sub: argparse._SubParsersAction) -> None:
    epilog = ("Environment: TRINITY_URL (default %s), TRINITY_API_KEY. Exit codes: 0 succeeded, 1 job failed, "
              "2 usage, 3 job cancelled, 4 invalid spec, refused by / cannot reach the service, "
              "5 sha256 mismatch." % DEFAULT_URL)
    submit = sub.add_parser("submit", help="upload a dataset, create a job, print its id", epilog=epilog)
    submit.add_argument("spec", type=Path, help="job spec (YAML or JSON; checked before anything is uploaded)")
    submit.add_argument("--data", type=Path, help="training file to upload (default: the spec's data.path)")
    submit.add_argument("--queue", help="GPU queue (default: the smallest GPU class the job's memory estimate "
                        "fits, when the service knows their sizes; else its first queue)")
    submit.add_argument("--wait", action="store_true", help="follow the job until it ends; exit code = its outcome")
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", help="one job in detail, or a table of recent jobs", epilog=epilog)
    status.add_argument("job_id", nargs="?")
    status.add_argument("--limit", type=int, default=20)
    status.add_argument("--json", action="store_true", help="print the API's JSON")
    status.set_defaults(func=cmd_status)

    logs = sub.add_parser("logs", help="a job's events; -f follows the live stream", epilog=epilog)
    logs.add_argument("job_id")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="follow (Server-Sent Events, reconnecting with Last-Event-ID) until the job ends")
    logs.set_defaults(func=cmd_logs)

    cancel = sub.add_parser("cancel", help="cancel a job", epilog=epilog)
    cancel.add_argument("job_id")
    cancel.set_defaults(func=cmd_cancel)

    download = sub.add_parser("download", help="download a job's artifacts (resumable, sha256-checked)", epilog=epilog)
    download.add_argument("job_id")
    download.add_argument("--artifact", action="append", metavar="NAME",
                          help="an artifact name or part of one (q4_k_m, report.json); repeatable; default all")
    download.add_argument("-o", "--output", type=Path, default=Path("."), help="directory (default: .)")
    download.set_defaults(func=cmd_download)


# ── the connection ───────────────────────────────────────────────────────────────────────────

def client(timeout: float = 60.0):  # noqa: ANN201
    import httpx

    key = os.environ.get("TRINITY_API_KEY")
    if not key:
        raise ClientError("set TRINITY_API_KEY (an administrator creates one: trinity keys create --tenant NAME)",
                          EXIT_USAGE)
    url = os.environ.get("TRINITY_URL", DEFAULT_URL).rstrip("/")
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)


def call(api, method: str, path: str, **kwargs: Any):  # noqa: ANN001, ANN201
    """One request; an error answer or no answer becomes a ClientError with the service's message."""
    import httpx

    try:
        r = api.request(method, path, **kwargs)
    except httpx.HTTPError as error:
        raise ClientError(f"cannot reach {api.base_url}: {error}") from None
    if r.status_code >= 400:
        raise ClientError(_error_text(r))
    return r


def _error_text(r) -> str:  # noqa: ANN001
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {r.status_code}: {r.text[:500]}"
    lines = [f"error {r.status_code} {err.get('code')}: {err.get('message')}"]
    for d in err.get("details") or []:
        if isinstance(d, dict) and "loc" in d:
            lines.append(f"  {d['loc']}: {d.get('msg')}")
        elif isinstance(d, dict) and "row" in d:
            lines.append(f"  row {d['row']} {d.get('field') or ''}: {d.get('message')}")
    return "\n".join(lines)


def run(fn, args: argparse.Namespace) -> int:  # noqa: ANN001
    try:
        return fn(args)
    except ClientError as error:
        print(f"trinity: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        return 130


def _tty() -> bool:
    return sys.stdout.isatty()


# ── submit ───────────────────────────────────────────────────────────────────────────────────

def cmd_submit(args: argparse.Namespace) -> int:
    return run(_submit, args)


def _submit(args: argparse.Namespace) -> int:
    spec = _load_spec(args.spec)
    data = spec.get("data") or {}
    if not isinstance(data, dict):
        _check_spec(spec)  # says that data must be a mapping
    path = args.data or (args.spec.parent / data["path"] if data.get("path") else None)
    if path is None:
        raise ClientError("give the training file with --data FILE (or set data.path in the spec)", EXIT_USAGE)
    if not Path(path).is_file():
        raise ClientError(f"{path}: no such file", EXIT_USAGE)
    remote_data = {k: v for k, v in data.items() if k not in REMOTE_DATA_FIELDS}
    _check_spec(spec | {"data": remote_data | {"dataset_id": "ds-to-upload"}})  # before anything is uploaded
    with client(timeout=600) as api:
        fields = {"format": data["format"]} if data.get("format") else {}
        if data.get("columns"):
            fields["columns"] = json.dumps(data["columns"])
        print(f"uploading {path} ({_size(Path(path).stat().st_size)})", flush=True)
        with open(path, "rb") as f:
            dataset = call(api, "POST", "/datasets", files={"file": (Path(path).name, f)}, data=fields).json()
        print_dataset(dataset)
        try:
            if dataset["status"] != "valid" and not data.get("drop_invalid_rows"):
                raise ClientError("the dataset has invalid rows: fix them, or set data.drop_invalid_rows: true "
                                  "to train on the rest")
            spec["data"] = remote_data | {"dataset_id": dataset["id"]}
            job = call(api, "POST", "/jobs", json=spec, params={"queue": args.queue} if args.queue else None).json()
        except ClientError:
            _delete_dataset(api, dataset["id"])  # no job will use it: leave no orphan behind
            raise
        print(f"job {job['id']} {job['status']}" + (f" (queue position {job['queue_position']})"
                                                   if job.get("queue_position") else ""), file=sys.stderr)
        print(job["id"], flush=True)  # the one line on stdout a script wants: JOB=$(trinity submit ... | tail -1)
        if not args.wait:
            return EXIT_OK
        return follow(api, job["id"])


def _load_spec(path: Path) -> dict[str, Any]:
    from trinity_core.errors import SpecError
    from trinity_core.spec import read_spec_file

    try:
        spec = read_spec_file(path)
    except SpecError as error:
        raise ClientError(error.message, EXIT_USAGE) from None
    if not isinstance(spec, dict):
        raise ClientError(f"{path}: a spec is a mapping (model:, data:, lora:, train:, export:)", EXIT_USAGE)
    return spec


def _check_spec(spec: dict[str, Any]) -> None:
    """The spec as it will be sent, checked here: every problem, in the service's words (exit 4)."""
    from trinity_core.errors import SpecError
    from trinity_core.spec import parse_spec

    try:
        parse_spec(spec)
    except SpecError as error:
        lines = [f"error {error.code}: {error.message}"]
        lines += [f"  {d['loc']}: {d['msg']}" for d in error.details or []]
        raise ClientError("\n".join(lines) + "\nnothing was uploaded") from None


def _delete_dataset(api, dataset_id: str) -> None:  # noqa: ANN001
    try:
        call(api, "DELETE", f"/datasets/{dataset_id}")
        print(f"dataset {dataset_id} deleted (no job uses it)", file=sys.stderr)
    except ClientError as error:
        print(f"could not delete dataset {dataset_id}: {error}", file=sys.stderr)


def print_dataset(ds: dict[str, Any]) -> None:
    stats = ds.get("stats") or {}
    print(f"dataset {ds['id']}: {ds['status']}, format {ds.get('format')}, {ds.get('rows')} rows "
          f"({stats.get('valid_rows', '?')} valid, {stats.get('invalid_rows', 0)} invalid, "
          f"{stats.get('duplicates', 0)} duplicates)")
    for e in ds.get("errors", [])[:20]:
        print(f"  row {e.get('row')}: {e.get('field') or ''} {e.get('message')} [{e.get('kind')}]")
    if len(ds.get("errors", [])) > 20:
        print(f"  … {len(ds['errors']) - 20} more (trinity validate FILE lists every one)")
    for w in ds.get("warnings", []):
        print(f"  warning: {w if isinstance(w, str) else json.dumps(w)}")


# ── following a job ──────────────────────────────────────────────────────────────────────────

def follow(api, job_id: str) -> int:  # noqa: ANN001
    """Events until the job ends: a progress bar on a terminal, plain lines otherwise."""
    bar = Bar(f"{job_id}") if _tty() else None
    for event in stream_events(api, job_id):
        data = event.get("data") or {}
        if bar and event["type"] == "metrics" and data.get("total_steps"):
            bar.update(data.get("step", 0), data["total_steps"], f"loss {data.get('loss', 0):.4f}")
        else:
            if bar:
                bar.clear()
            print(format_event(event), flush=True)
    if bar:
        bar.done()
    return report_outcome(call(api, "GET", f"/jobs/{job_id}").json())


def report_outcome(job: dict[str, Any]) -> int:
    status = job["status"]
    if status == "failed" and job.get("error"):
        print(f"job {job['id']} failed: {job['error']['code']}: {job['error']['message']}", file=sys.stderr)
    else:
        print(f"job {job['id']} {status}", file=sys.stderr)
    return TERMINAL.get(status, EXIT_OK)


def format_event(e: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(e["time"]))
    level = "" if e["level"] == "info" else f"{e['level'].upper()} "
    return f"{stamp} #{e['seq']:<4} {level}{e['message']}"


def sse_blocks(lines: Iterable[str]) -> Iterator[dict[str, str]]:
    """Server-sent events: one ``{field: value}`` dict per blank-line-terminated block, comments
    (``:`` lines, the keep-alives) skipped."""
    block: dict[str, str] = {}
    for line in lines:
        if line.startswith(":"):
            continue
        if line:
            field, _, value = line.partition(":")
            block[field] = value.removeprefix(" ")
            continue
        if block:
            yield block
        block = {}


def stream_events(api, job_id: str, retry_s: float = 2.0, max_failures: int = 30):  # noqa: ANN001, ANN201
    """Yield the job's events from the SSE stream until ``event: end``. A dropped connection (API
    restart, proxy timeout) is reopened with ``Last-Event-ID``: nothing is lost or repeated."""
    import httpx

    last, failures = 0, 0
    while True:
        try:
            headers = {"Last-Event-ID": str(last), "Accept": "text/event-stream"}
            with api.stream("GET", f"/jobs/{job_id}/events/stream", headers=headers,
                            timeout=httpx.Timeout(30, read=60)) as r:
                if r.status_code >= 400:
                    r.read()
                    raise ClientError(_error_text(r))
                for block in sse_blocks(r.iter_lines()):
                    if block.get("event") == "end":
                        return
                    if "retry" in block and block["retry"].isdigit():
                        retry_s = int(block["retry"]) / 1000
                    if "data" in block and "id" in block:
                        last = int(block["id"])
                        failures = 0
                        yield json.loads(block["data"])
        except httpx.HTTPError as error:
            failures += 1
            if failures > max_failures:
                raise ClientError(f"lost the event stream of {job_id}: {error}") from None
            print(f"(connection lost: {error.__class__.__name__}; reconnecting after event {last})",
                  file=sys.stderr, flush=True)
        time.sleep(retry_s)


# ── status, logs, cancel ─────────────────────────────────────────────────────────────────────

def cmd_status(args: argparse.Namespace) -> int:
    return run(_status, args)


def _status(args: argparse.Namespace) -> int:
    with client() as api:
        if args.job_id is None:
            jobs = call(api, "GET", "/jobs", params={"limit": args.limit}).json()["data"]
            if args.json:
                print(json.dumps(jobs, indent=2))
            else:
                print_jobs(jobs)
            return EXIT_OK
        job = call(api, "GET", f"/jobs/{args.job_id}").json()
        if args.json:
            print(json.dumps(job, indent=2))
        else:
            evals = call(api, "GET", f"/jobs/{args.job_id}/events",
                         params={"type": "eval", "limit": 1000}).json()["data"]
            print(describe(job, evals))
        return TERMINAL.get(job["status"], EXIT_OK)


def print_jobs(jobs: list[dict[str, Any]]) -> None:
    if not jobs:
        print("no jobs yet: trinity submit SPEC --data FILE")
        return
    rows = [(j["id"], j["status"], str((j["spec"].get("model") or {}).get("name_or_path", ""))[-40:],
             f"{j.get('step') or 0}/{j.get('total_steps') or (j['spec'].get('train') or {}).get('max_steps', '?')}",
             _when(j.get("started_at")), _duration(j)) for j in jobs]
    header = ("ID", "STATUS", "MODEL", "STEP", "STARTED", "DURATION")
    if not _tty():  # one tab-separated line per job, easy to cut/awk
        for row in rows:
            print("\t".join(row))
        return
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def describe(job: dict[str, Any], evals: list[dict[str, Any]] = ()) -> str:
    """The job in a few lines; ``evals``: its ``eval`` events (held-out loss during training)."""
    total = job.get("total_steps") or (job["spec"].get("train") or {}).get("max_steps")
    lines = [f"{job['id']}  {job['status']}" + ("  (cancel requested)" if job.get("cancel_requested") else ""),
             f"  model     {(job['spec'].get('model') or {}).get('name_or_path')}",
             f"  progress  step {job.get('step') or 0}/{total or '?'}" + (f", stage {job['stage']}" if job.get("stage") else "")
             + (f", loss {job['loss']:.4f}" if job.get("loss") is not None else "")
             + (f", eta {job['eta_s']:.0f} s" if job.get("eta_s") and job["status"] == "running" else "")]
    if job.get("queue_position"):
        lines.append(f"  queue     {job['queue']} position {job['queue_position']}")
    if job.get("rung"):
        lines.append(f"  settings  {job['rung']}: {json.dumps(job.get('settings'))}")
    for a in job.get("attempts") or []:
        if a.get("outcome") != "ok":
            lines.append(f"  attempt   {a.get('rung')}: {a.get('outcome')}")
    lines += _evaluation(job.get("result") or {}, evals)
    lines.append(f"  started   {_when(job.get('started_at'))}  duration {_duration(job)}")
    if job.get("error"):
        lines.append(f"  error     {job['error']['code']}: {job['error']['message']}")
    return "\n".join(lines)


def _evaluation(result: dict[str, Any], evals: list[dict[str, Any]]) -> list[str]:
    """The latest held-out loss and the best so far (eval events), then the exported step and why."""
    lines = []
    if evals:
        d = evals[-1]["data"]
        lines.append(f"  eval      loss {d['eval_loss']:.4f} at step {d['step']}; best {d['best_eval_loss']:.4f} "
                     f"at step {d['best_step']} ({len(evals)} evaluation{'' if len(evals) == 1 else 's'})")
    if result.get("early_stopping"):
        lines.append(f"  stopped   early at step {result['early_stopping']['step']}: {result['early_stopping']['why']}")
    if result.get("checkpoint"):
        c = result["checkpoint"]
        lines.append(f"  exported  step {c['step']} ({c['checkpoint']}): {c['why']}")
    return lines


def cmd_logs(args: argparse.Namespace) -> int:
    return run(_logs, args)


def _logs(args: argparse.Namespace) -> int:
    with client() as api:
        if args.follow:
            for event in stream_events(api, args.job_id):
                print(format_event(event), flush=True)
            return report_outcome(call(api, "GET", f"/jobs/{args.job_id}").json())
        after = 0
        while True:
            page = call(api, "GET", f"/jobs/{args.job_id}/events", params={"after": after, "limit": 1000}).json()
            for event in page["data"]:
                print(format_event(event))
            if not page["has_more"]:
                return EXIT_OK
            after = page["last_seq"]


def cmd_cancel(args: argparse.Namespace) -> int:
    return run(_cancel, args)


def _cancel(args: argparse.Namespace) -> int:
    with client() as api:
        job = call(api, "POST", f"/jobs/{args.job_id}/cancel").json()
        print(f"{job['id']} {job['status']}" + (" (stops at its next step, keeping its last checkpoint)"
                                                if job["status"] == "cancelling" else ""))
        return EXIT_OK


# ── download ─────────────────────────────────────────────────────────────────────────────────

def cmd_download(args: argparse.Namespace) -> int:
    return run(_download, args)


def _download(args: argparse.Namespace) -> int:
    with client(timeout=600) as api:
        manifest = call(api, "GET", f"/jobs/{args.job_id}/artifacts").json()
        if not manifest:
            raise ClientError(f"job {args.job_id} has no artifacts (yet): trinity status {args.job_id}")
        chosen = manifest
        if args.artifact:
            chosen = [a for a in manifest if any(a["name"] == w for w in args.artifact)] or \
                     [a for a in manifest if any(w in a["name"] for w in args.artifact)]
            if not chosen:
                raise ClientError(f"no artifact matches {', '.join(args.artifact)}; the job has: "
                                  + ", ".join(a["name"] for a in manifest))
        out = args.output.resolve()
        for artifact in chosen:
            target = (out / artifact["name"]).resolve()
            if not target.is_relative_to(out):  # names come from the server: stay inside -o
                raise ClientError(f"refusing artifact name {artifact['name']!r}")
            fetch(api, args.job_id, artifact, target)
        return EXIT_OK


def fetch(api, job_id: str, artifact: dict[str, Any], target: Path) -> None:  # noqa: ANN001
    """Download to ``target.part`` (resuming it with Range/If-Range), check the sha256, rename."""
    import httpx

    name, want, size = artifact["name"], artifact.get("sha256"), artifact.get("size")
    if target.is_file() and want and _sha256(target) == want:
        print(f"{target}: already here, sha256 ok")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={have}-", "If-Range": f'"{want}"'} if have and want else {}
    bar = Bar(name) if _tty() else None
    url = f"/jobs/{job_id}/artifacts/{name}"
    try:
        with api.stream("GET", url, headers=headers) as r:
            if r.status_code == 416:  # the .part is already whole (or longer): check it below
                pass
            elif r.status_code >= 400:
                r.read()
                raise ClientError(_error_text(r))
            else:
                mode = "ab" if r.status_code == 206 else "wb"
                done = have if r.status_code == 206 else 0
                if not bar and done:
                    print(f"{name}: resuming at {_size(done)}")
                total = size or (done + int(r.headers.get("content-length", 0)))
                with open(part, mode) as f:
                    for chunk in r.iter_bytes(1 << 20):
                        f.write(chunk)
                        done += len(chunk)
                        if bar:
                            bar.update(done, total, f"{_size(done)}/{_size(total)}")
    except httpx.HTTPError as error:
        raise ClientError(f"{name}: download interrupted ({error}); run the same command again to resume") from None
    if bar:
        bar.done()
    got = _sha256(part)
    if want and got != want:
        part.unlink()
        raise ClientError(f"{name}: sha256 {got} does not match the manifest's {want}; deleted", EXIT_CHECKSUM)
    os.replace(part, target)
    print(f"{target}: {_size(target.stat().st_size)}, sha256 {got[:16]}… ok")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ── terminal helpers ─────────────────────────────────────────────────────────────────────────

class Bar:
    """A one-line progress bar on stderr (only used on a terminal)."""

    def __init__(self, label: str, width: int = 30):
        self.label, self.width, self.shown = label, width, False

    def update(self, done: float, total: float, text: str = "") -> None:
        frac = min(1.0, done / total) if total else 0.0
        fill = int(frac * self.width)
        sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (self.width - fill)}] {frac:4.0%} {text}\033[K")
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            self.shown = False

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            self.shown = False


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _duration(job: dict[str, Any]) -> str:
    if not job.get("started_at"):
        return "-"
    s = int((job.get("finished_at") or time.time()) - job["started_at"])
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
