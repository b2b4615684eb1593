"""GET /jobs/{id}/checkpoints, /artifacts (the manifest) and /artifacts/{name} (download).

A download is looked up by its exact ``name`` in the job's manifest (``artifacts.json``, written
by the core); the path comes from the manifest, is resolved and must stay inside the job's
workdir. No path is ever built from the requested name, so ``../`` and friends are just unknown
names (404). Downloads stream with Content-Length, ``ETag`` = the sha256, and HTTP Range (206).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import FileResponse

from api.deps import JobDep, SettingsDep
from api.errors import ApiError, ErrorResponse, not_found
from trinity_service.models import ArtifactPublic, CheckpointPublic
from trinity_service.settings import Settings
from trinity_core.artifacts import MANIFEST, read_json

router = APIRouter(prefix="/jobs/{job_id}", tags=["artifacts"])
STEP_DIR = re.compile(r"^step-(\d+)$")  # trinity_core.train.trainer's complete-checkpoint names (without importing torch)
EVAL_FILE = "trinity_eval.json"  # trinity_core.train.eval_loop.EVAL_FILE: {step, eval_loss, state: {best_step, ...}}


def workdir(settings: Settings, job_id: str) -> Path:
    return settings.jobs_dir / job_id


def manifest(settings: Settings, job_id: str) -> list[dict[str, Any]]:
    rows = read_json(workdir(settings, job_id) / MANIFEST) or []
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("name"), str)]


@router.get("/checkpoints", response_model=list[CheckpointPublic])
def list_checkpoints(job: JobDep, settings: SettingsDep):
    """Complete checkpoints (``checkpoints/step-N``), oldest first; a resumed job starts from the newest.
    Each has its held-out loss when the step was evaluated during training, and ``best`` marks the
    evaluated step with the lowest one."""
    return checkpoints(settings, job.id)


def checkpoints(settings: Settings, job_id: str) -> list[CheckpointPublic]:
    root = workdir(settings, job_id) / "checkpoints"
    found, evals = [], {}
    if root.is_dir():
        for path in root.iterdir():
            if (m := STEP_DIR.match(path.name)) and path.is_dir():
                size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                evals[int(m.group(1))] = _eval_file(path)
                found.append(CheckpointPublic(step=int(m.group(1)), created_at=path.stat().st_mtime, size_bytes=size,
                                              eval_loss=_number(evals[int(m.group(1))].get("eval_loss"))))
    found.sort(key=lambda c: c.step)
    best = (evals[found[-1].step].get("state") or {}).get("best_step") if found else None  # the newest knows
    for c in found:
        c.best = c.step == best
    return found


def _eval_file(path: Path) -> dict[str, Any]:
    data = read_json(path / EVAL_FILE)
    return data if isinstance(data, dict) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@router.get("/artifacts", response_model=list[ArtifactPublic])
def list_artifacts(job: JobDep, settings: SettingsDep):
    """The job's manifest: every downloadable file with its kind, size and sha256."""
    return [ArtifactPublic(name=r["name"], kind=r.get("kind"), size=r.get("size"), sha256=r.get("sha256"))
            for r in manifest(settings, job.id)]


@router.get("/artifacts/{name:path}", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "Range"},
                       416: {"model": ErrorResponse, "description": "Range past the end"}})
def download_artifact(job: JobDep, settings: SettingsDep, name: str,
                      range_header: Annotated[str | None, Header(alias="Range")] = None):
    entry = next((r for r in manifest(settings, job.id) if r["name"] == name), None)
    if entry is None:
        raise not_found("artifact", name, "name")
    root = workdir(settings, job.id).resolve()
    path = (root / str(entry.get("path", ""))).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise not_found("artifact", name, "name")
    size = path.stat().st_size
    if range_header and _unsatisfiable(range_header, size):
        raise ApiError(416, "range_not_satisfiable", f"{range_header!r} is outside the {size} bytes of {name}",
                       param="Range", headers={"Content-Range": f"bytes */{size}"})
    if range_header is not None and (problem := _malformed(range_header, size)):
        # Starlette would answer a text/plain 400; keep the one JSON error shape (found by schemathesis)
        raise ApiError(400, "invalid_request", f"malformed Range header: {problem}", param="Range")
    headers = {"ETag": f'"{entry["sha256"]}"'} if entry.get("sha256") else {}
    return FileResponse(path, filename=Path(name).name, headers=headers, media_type="application/octet-stream")


def _malformed(header: str, size: int) -> str | None:
    """Why Starlette's FileResponse would refuse this Range header as malformed, or None."""
    parse = getattr(FileResponse, "_parse_range_header", None)
    if parse is None or not size:
        return None
    try:
        parse(header, size)
    except Exception as error:  # MalformedRangeHeader (RangeNotSatisfiable is answered above)
        if type(error).__name__ == "MalformedRangeHeader":
            return str(getattr(error, "content", None) or error) or "unparsable"
    return None


def _unsatisfiable(header: str, size: int) -> bool:
    """True when every range of a ``bytes=`` header starts past the end (Starlette answers the rest)."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes":
        return False
    starts = []
    for part in spec.split(","):
        first = part.strip().partition("-")[0].strip()
        if first.isdigit():
            starts.append(int(first))
        elif part.strip().startswith("-"):
            starts.append(0 if size else 1)  # a suffix range is satisfiable on a non-empty file
    return bool(starts) and all(s >= size for s in starts)
