"""Which queue a job goes to: the smallest GPU class its memory estimate fits.

Queues are GPU classes (``TRINITY_GPU_QUEUES``); ``TRINITY_QUEUE_GPU_GIB`` gives each its GPU memory
(``gpu.t4=15.1,gpu.a100=79:bf16``). A job submitted without a queue is estimated per ladder rung
(``trinity_core.train.memory``, as ``POST /jobs/estimate``) for each sized queue, smallest first:

1. ``recipe_fits``: the smallest queue whose GPU fits the recipe rung (the spec as written);
2. ``cheapest_rung_fits``: else the smallest that fits the ladder's cheapest rung (the job steps
   down the ladder there, starting at the first rung predicted to fit);
3. else 422 ``no_queue_fits``, naming the cheapest rung's estimate and the largest queue.

An explicit queue is honoured (``explicit``), but refused (422 ``queue_too_small``) when its GPU
does not fit even the cheapest rung; a queue with no size is not checked. Without any sizes every
job goes to the first queue (``default``), as before routing existed.

The estimate assumes the backend a GPU worker runs: the spec's ``model.backend``, ``auto`` being
Unsloth (the GPU image has it); ``fast_dora`` is the service's setting. The decision, with the
estimates it compared, is stored on the job row (``routing``) and shown by ``GET /jobs/{id}``.
"""

from __future__ import annotations

from typing import Any

from api.errors import ApiError
from trinity_core import model_config
from trinity_core.errors import ModelUnavailable
from trinity_core.spec import JobSpec
from trinity_core.train import ladder, memory
from trinity_service.settings import Settings


def route(spec: JobSpec, queue: str | None, settings: Settings) -> tuple[str, dict[str, Any]]:
    """``(queue, routing record)`` for a checked spec; ``queue``: the one the client asked for, or None."""
    sized = sorted(settings.queue_gpu_gib.items(), key=lambda item: (item[1].gib, item[0]))
    if queue is not None and queue not in settings.queue_gpu_gib:
        return queue, {"rule": "explicit", "queue": queue,
                       "reason": f"asked for {queue}, which has no GPU size configured (TRINITY_QUEUE_GPU_GIB): "
                                 "not checked against the estimate"}
    if not sized:
        return settings.default_queue, {"rule": "default", "queue": settings.default_queue,
                                        "reason": "no queue GPU sizes configured (TRINITY_QUEUE_GPU_GIB): "
                                                  "the first of TRINITY_GPU_QUEUES"}
    try:
        config = model_config.load(spec.model.name_or_path, spec.model.revision)
        fits = {name: _fit(spec, config, name, gpu.gib, gpu.bf16, settings) for name, gpu in sized}
    except (ModelUnavailable, OSError, ValueError, TypeError, KeyError) as error:
        # The model was checked before (api/policy.py); a config the estimate cannot read is the
        # worker's problem to report, not a reason to refuse a job the ladder may still run.
        chosen = queue or settings.default_queue
        return chosen, {"rule": "explicit" if queue else "default", "queue": chosen,
                        "reason": f"no estimate ({type(error).__name__}: {error}); "
                                  + (f"asked for {chosen}" if queue else "the first of TRINITY_GPU_QUEUES")}

    if queue is not None:
        fit = fits[queue]
        if fit["start_rung"] is None:
            raise ApiError(422, "queue_too_small", f"queue {queue} has {fit['gpu_gib']:g} GiB; this job needs "
                           f"{fit['cheapest_gib']:.2f} GiB even on the ladder's cheapest rung "
                           f"({fit['cheapest_rung']}) by the estimate (+ allocator margin)"
                           + _larger_hint(fits, queue), param="queue", details=list(fits.values()))
        return queue, _record("explicit", fit, fits, f"asked for {queue} ({fit['gpu_gib']:g} GiB); "
                              f"{_start(fit)}")
    for name, _ in sized:
        if fits[name]["start_rung"] == "recipe":
            fit = fits[name]
            return name, _record("recipe_fits", fit, fits, f"the recipe rung needs {fit['recipe_gib']:.2f} GiB: "
                                 f"{name} ({fit['gpu_gib']:g} GiB) is the smallest queue it fits")
    for name, _ in sized:
        if fits[name]["start_rung"] is not None:
            fit = fits[name]
            return name, _record("cheapest_rung_fits", fit, fits, f"the recipe rung fits no queue; {name} "
                                 f"({fit['gpu_gib']:g} GiB) is the smallest that fits a cheaper rung: {_start(fit)}")
    largest, big = sized[-1][0], fits[sized[-1][0]]
    raise ApiError(422, "no_queue_fits", f"no queue's GPU fits this job: it needs {big['cheapest_gib']:.2f} GiB "
                   f"even on the ladder's cheapest rung ({big['cheapest_rung']}) by the estimate (+ allocator "
                   f"margin); the largest queue is {largest} with {big['gpu_gib']:g} GiB. Lower "
                   "model.max_seq_length, train.batch_size or lora.r, or add a larger GPU class",
                   param="queue", details=list(fits.values()))


def _fit(spec: JobSpec, config: Any, name: str, gib: float, bf16: bool, settings: Settings) -> dict[str, Any]:
    """The job's estimate on one queue's GPU: recipe and cheapest rung, and where the ladder would start."""
    backend = "unsloth" if spec.model.backend == "auto" else spec.model.backend
    rungs = ladder.rungs(spec)
    plans = memory.plan(rungs, spec, config, backend, gib, bf16_supported=bf16, fast_dora=settings.fast_dora,
                        compiled_layers=settings.compiled_layers)
    start = next((p for p in plans if p.fits), None)
    # Usually the last rung, not always: dropping DoRA can cost more than it saves (fast DoRA's fused MLP)
    cheapest = min(plans, key=lambda p: p.estimate.gib)
    return {"queue": name, "gpu_gib": gib, "bf16": bf16, "backend": backend,
            "recipe_gib": round(plans[0].estimate.gib, 3),
            "cheapest_rung": cheapest.name, "cheapest_gib": round(cheapest.estimate.gib, 3),
            "start_rung": start and start.name, "start_gib": start and round(start.estimate.gib, 3)}


def _start(fit: dict[str, Any]) -> str:
    if fit["start_rung"] == "recipe":
        return f"the recipe rung fits ({fit['recipe_gib']:.2f} GiB)"
    return (f"the ladder starts at {fit['start_rung']} ({fit['start_gib']:.2f} GiB; "
            f"the recipe needs {fit['recipe_gib']:.2f})")


def _larger_hint(fits: dict[str, dict[str, Any]], queue: str) -> str:
    larger = [name for name, fit in fits.items() if name != queue and fit["start_rung"] is not None]
    return f"; it fits {', '.join(larger)}, or leave the queue out to route it by its estimate" if larger else ""


def _record(rule: str, fit: dict[str, Any], fits: dict[str, dict[str, Any]], reason: str) -> dict[str, Any]:
    return {"rule": rule, "queue": fit["queue"], "reason": reason, "estimate": fit,
            "compared": [{k: f[k] for k in ("queue", "gpu_gib", "recipe_gib", "cheapest_gib", "start_rung")}
                         for f in fits.values()]}
