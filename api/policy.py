"""What the service accepts beyond the core spec's own rules: a spec may not read server files.

A job's data comes from an uploaded dataset (``data.dataset_id``) or the hub, never a
server path (``data.path``); a local model must sit inside one of ``TRINITY_MODEL_DIRS``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from api.settings import Settings


def is_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).exists()


def model_problem(name: str | None, settings: Settings) -> str | None:
    """Why ``name`` (a hub id or a local directory) may not be used, or None."""
    if not name or not is_local(name):
        return None
    path = Path(name).expanduser().resolve()
    if any(path.is_relative_to(Path(d).expanduser().resolve()) for d in settings.model_dirs):
        return None
    allowed = ", ".join(str(d) for d in settings.model_dirs) or "none configured (TRINITY_MODEL_DIRS)"
    return f"local model paths must be inside the model directories: {allowed}"


def spec_problems(body: dict[str, Any], settings: Settings) -> list[dict[str, str]]:
    """Problems with a (raw, possibly otherwise invalid) spec body, so one 422 lists them all."""
    def part(name: str) -> dict[str, Any]:
        value = body.get(name)
        return value if isinstance(value, dict) else {}

    data, problems = part("data"), []
    if data.get("path"):
        problems.append({"loc": "data.path", "msg": "the service does not read server paths: upload the file "
                         "with POST /datasets and pass data.dataset_id"})
    elif not (data.get("dataset_id") or data.get("hub")):
        problems.append({"loc": "data.dataset_id", "msg": "give data.dataset_id (POST /datasets) or data.hub"})
    for loc, value in (("model.name_or_path", part("model").get("name_or_path")),
                       ("export.original_model", part("export").get("original_model"))):
        if isinstance(value, str) and (msg := model_problem(value, settings)):
            problems.append({"loc": loc, "msg": msg})
    return problems
