"""The demo's client side, as a user would write it with httpx: upload, submit, follow, download,
verify, run. Prints where everything went."""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import httpx
import yaml


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--spec", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", required=True, help="local model dir the spec trains")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--queue", help="the queue to run the job on (default: the service's first queue)")
    args = ap.parse_args()
    started = time.monotonic()
    api = httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {args.key}"}, timeout=60)
    wait_healthy(api)

    with args.data.open("rb") as f:
        r = api.post("/datasets", files={"file": (args.data.name, f, "application/jsonl")})
    r.raise_for_status()
    ds = r.json()
    print(f"==> dataset {ds['id']}: {ds.get('rows')} rows, format {ds.get('format')}")

    spec = yaml.safe_load(args.spec.read_text())
    spec["model"]["name_or_path"] = args.model
    spec["data"] = {k: v for k, v in spec["data"].items() if k != "path"} | {"dataset_id": ds["id"]}
    r = api.post("/jobs", json=spec, params={"queue": args.queue} if args.queue else None,
                 headers={"Idempotency-Key": f"demo-{ds['id']}"})
    if r.status_code >= 400:
        print(r.text, file=sys.stderr)
        return 1
    job = r.json()
    print(f"==> job {job['id']} {job['status']}")

    job = follow(api, job["id"])
    if job["status"] != "succeeded":
        print(f"job ended {job['status']}: {job.get('error')}", file=sys.stderr)
        return 1

    manifest = {a["name"]: a for a in api.get(f"/jobs/{job['id']}/artifacts").raise_for_status().json()}
    gguf = next(n for n in manifest if n.endswith("q4_k_m.gguf"))
    path = download(api, job["id"], manifest[gguf], args.out)
    print(f"==> downloaded {path} ({path.stat().st_size / 2**20:.1f} MiB), sha256 matches the manifest")
    for name in ("report.json", "report.md", "Modelfile"):
        if name in manifest:
            download(api, job["id"], manifest[name], args.out)

    reply = generate(path, "What is the capital of France?")
    print(f"==> llama.cpp ({gguf}) answers 'What is the capital of France?': {reply!r}")
    report_md = args.out / "report.md"
    if report_md.exists():
        print("==> report (base vs fine-tuned):")
        print(report_md.read_text())
    print(f"==> demo finished in {time.monotonic() - started:.0f}s; files in {args.out}")
    return 0


def wait_healthy(api: httpx.Client, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if api.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("the service did not come up; see serve.log")


def follow(api: httpx.Client, job_id: str) -> dict:
    last = None
    while True:
        job = api.get(f"/jobs/{job_id}").raise_for_status().json()
        line = (job["status"], job.get("stage"), job.get("step"))
        if line != last:
            loss = f" loss {job['loss']:.3f}" if job.get("loss") is not None else ""
            step = f" step {job['step']}/{job['total_steps']}" if job.get("step") else ""
            print(f"    {job['status']:<10} {job.get('stage') or '':<8}{step}{loss}", flush=True)
            last = line
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(1)


def download(api: httpx.Client, job_id: str, entry: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / Path(entry["name"]).name
    digest = hashlib.sha256()
    with api.stream("GET", f"/jobs/{job_id}/artifacts/{entry['name']}") as r, path.open("wb") as f:
        r.raise_for_status()
        for chunk in r.iter_bytes():
            digest.update(chunk)
            f.write(chunk)
    if digest.hexdigest() != entry["sha256"]:
        raise SystemExit(f"sha256 mismatch for {entry['name']}")
    return path


def generate(gguf: Path, question: str) -> str:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=256, verbose=False, seed=0)
    out = llm.create_chat_completion([{"role": "user", "content": question}], max_tokens=24, temperature=0)
    return out["choices"][0]["message"]["content"]


if __name__ == "__main__":
    sys.exit(main())
