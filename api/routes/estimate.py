"""POST /jobs/estimate: the pre-flight memory estimate for every rung of a spec's OOM ladder, so a
user sees before submitting which rung a GPU of a given size would start on, and why."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query

from api.deps import SettingsDep
from api.errors import ApiError
from api.policy import model_problem
from trinity_core import model_config
from trinity_core.train import ladder, memory
from trinity_core.errors import ModelUnavailable, SpecError
from trinity_core.spec import parse_spec

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post("/estimate", responses={422: {"description": "Invalid spec (invalid_spec), or the model's config "
                                                    "cannot be found now (model_unavailable)"}})
def estimate_job(
    settings: SettingsDep,
    body: Annotated[dict[str, Any], Body(description="A job spec (the dataset is not needed)")],
    gpu_gib: Annotated[float, Query(gt=0, le=4096, description="GPU memory to plan for; 15.1 = a T4")] = 15.1,
    backend: Annotated[Literal["unsloth", "peft"], Query()] = "unsloth",
    bf16: Annotated[bool, Query(description="GPU supports bf16 (a T4 does not: fp32 path)")] = False,
) -> dict[str, Any]:
    try:
        spec = parse_spec(body)
    except SpecError as e:
        raise ApiError(422, e.code, e.message, param=e.param, details=e.details) from None
    if problem := model_problem(spec.model.name_or_path, settings):
        raise ApiError(422, "invalid_spec", problem, param="model.name_or_path")
    try:  # shipped config, local directory, HF cache, or one short hub request: never minutes of retries
        config = model_config.load(spec.model.name_or_path, spec.model.revision)
    except ModelUnavailable as e:
        raise ApiError(422, e.code, e.message, param=e.param, details=e.details) from None
    rungs = ladder.rungs(spec)
    plans = memory.plan(rungs, spec, config, backend, gpu_gib, bf16_supported=bf16)
    chosen = next((p.index for p in plans if p.fits), None)
    return {
        "gpu_gib": gpu_gib, "backend": backend, "bf16": bf16,
        "start_rung": rungs[chosen].name if chosen is not None else None,
        "rungs": [{"name": p.name, "settings": rungs[p.index].settings.to_dict(), "fits": p.fits,
                   **p.estimate.to_dict()} for p in plans],
        "note": "start_rung is the first rung predicted to fit (with the allocator margin); real OOMs "
                "still walk the ladder. null: no rung is predicted to fit; the last is still tried.",
    }
