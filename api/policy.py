"""What the service accepts beyond the core spec's own rules: a spec may not read server files,
and the model it names must be there before the job is queued.

A job's data comes from an uploaded dataset (``data.dataset_id``) or the hub, never a
server path (``data.path``; ``data.eval_path`` likewise: ``data.eval_dataset_id``); a local model must sit inside one of ``TRINITY_MODEL_DIRS`` and be a
model directory; a hub model must be resolvable now (``trinity_core.model_config``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trinity_service.settings import Settings
from trinity_core import model_config
from trinity_core.errors import ModelUnavailable
from trinity_core.spec import DEFAULT_MODEL


def model_problem(name: str | None, settings: Settings) -> str | None:
    """Why the local path ``name`` may not be used (it is outside TRINITY_MODEL_DIRS), or None.
    Checked before anything else, so nothing is said about server paths outside them."""
    if not name or not model_config.is_local(name):
        return None
    try:
        path = Path(name).expanduser().resolve()
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, ~user that does not exist
        return f"not a usable path: {e}"
    if any(path.is_relative_to(Path(d).expanduser().resolve()) for d in settings.model_dirs):
        return None
    allowed = ", ".join(str(d) for d in settings.model_dirs) or "none configured (TRINITY_MODEL_DIRS)"
    return f"local model paths must be inside the model directories: {allowed}"


def job_model_problem(name: str, revision: str | None, settings: Settings, *, loc: str) -> dict[str, str] | None:
    """Why a job may not use the model ``name`` (outside the model directories, or its config and
    weights cannot be found now), as one problem ``{"loc", "msg", "code"}``, or None."""
    if msg := model_problem(name, settings):
        return {"loc": loc, "msg": msg, "code": "invalid_spec"}
    try:
        model_config.resolve(name, revision, need_weights=True, param=loc)
    except ModelUnavailable as e:
        return {"loc": loc, "msg": e.message, "code": e.code}
    return None


def spec_problems(body: dict[str, Any], settings: Settings) -> list[dict[str, str]]:
    """Problems with a (raw, possibly otherwise invalid) spec body, so one 422 lists them all."""
    def part(name: str) -> dict[str, Any]:
        value = body.get(name)
        return value if isinstance(value, dict) else {}

    data, model, problems = part("data"), part("model"), []
    if data.get("path"):
        problems.append({"loc": "data.path", "msg": "the service does not read server paths: upload the file "
                         "with POST /datasets and pass data.dataset_id"})
    elif not (data.get("dataset_id") or data.get("hub")):
        problems.append({"loc": "data.dataset_id", "msg": "give data.dataset_id (POST /datasets) or data.hub"})
    if data.get("eval_path"):
        problems.append({"loc": "data.eval_path", "msg": "the service does not read server paths: upload the eval "
                         "file with POST /datasets and pass data.eval_dataset_id"})
    revision = model.get("revision") if isinstance(model.get("revision"), str) else None
    for loc, value, rev in (("model.name_or_path", model.get("name_or_path", DEFAULT_MODEL), revision),
                            ("export.original_model", part("export").get("original_model"), None)):
        if isinstance(value, str) and value and (problem := job_model_problem(value, rev, settings, loc=loc)):
            problems.append(problem)
    return problems
