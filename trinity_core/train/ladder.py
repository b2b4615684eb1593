"""The OOM ladder: cheaper settings, tried in the seed's order, when a CUDA OOM strikes.

Rungs are cumulative: ``seq_2048`` keeps its cut when ``r_32`` is tried next. A rung that would
change nothing (the spec already asks for seq 1024, say) is skipped. The ladder itself knows
nothing of backends; ``pipeline.run_job`` catches the OOM and asks for the next rung.
"""

from __future__ import annotations

import gc
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from trinity_core.spec import JobSpec

INJECT_OOM_ENV = "TRINITY_INJECT_OOM"


@dataclass(frozen=True)
class Settings:
    """The knobs the ladder turns. Everything else comes from the spec unchanged."""

    max_seq_length: int
    r: int
    use_dora: bool
    target_modules: tuple[str, ...]

    @classmethod
    def from_spec(cls, spec: JobSpec) -> Settings:
        return cls(
            max_seq_length=spec.model.max_seq_length,
            r=spec.lora.r,
            use_dora=spec.lora.use_dora,
            target_modules=tuple(spec.lora.target_modules),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    def apply(self, spec: JobSpec) -> JobSpec:
        """The spec with these settings written in (what actually runs)."""
        out = spec.model_copy(deep=True)
        out.model.max_seq_length = self.max_seq_length
        out.lora.r = self.r
        out.lora.use_dora = self.use_dora
        out.lora.target_modules = list(self.target_modules)
        return out


def _seq_2048(s: Settings) -> Settings:
    return replace(s, max_seq_length=min(s.max_seq_length, 2048))


def _r_32(s: Settings) -> Settings:
    return replace(s, r=min(s.r, 32))


def _dora_off(s: Settings) -> Settings:
    return replace(s, use_dora=False)


def _targets_qv(s: Settings) -> Settings:
    kept = tuple(t for t in s.target_modules if t in ("q_proj", "v_proj"))
    return replace(s, target_modules=kept or ("q_proj", "v_proj"))


RUNGS = {"seq_2048": _seq_2048, "r_32": _r_32, "dora_off": _dora_off, "targets_qv": _targets_qv}


@dataclass(frozen=True)
class Rung:
    name: str  # "recipe" for the spec as written, else the rung that was applied last
    settings: Settings


def ladder(spec: JobSpec) -> list[Rung]:
    """The rungs to try in order, starting with the spec itself; no-op rungs are dropped."""
    current = Settings.from_spec(spec)
    rungs = [Rung("recipe", current)]
    if not spec.ladder.enabled:
        return rungs
    for name in spec.ladder.rungs:
        nxt = RUNGS[name](current)
        if nxt != current:
            rungs.append(Rung(name, nxt))
            current = nxt
    return rungs


@dataclass
class Attempt:
    """One try at training: which rung, with what settings, how it ended."""

    rung: str
    settings: dict[str, Any]
    outcome: str = "running"  # running | ok | oom | skipped | failed | cancelled
    error: str | None = None
    seconds: float = 0.0
    estimate_gib: float | None = None
    steps_done: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_oom(error: BaseException) -> bool:
    """True for torch's OOM and for CUDA/cuBLAS allocation failures that surface as RuntimeError."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "CUDA out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text or "out of memory" in text.lower()
    )


DEBUG_MEMORY_ENV = "TRINITY_DEBUG_MEMORY"
LEFTOVER_LIMIT_GIB = 0.5
"""More than this still allocated after :func:`free_memory` means the next rung would start on a
card the failed attempt still holds: the job must continue in a fresh process."""


def leftover_gib() -> float:
    """GiB still allocated by this process on the current GPU (0 without CUDA)."""
    import torch

    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def free_memory() -> None:
    """Drop what the failed attempt held so the next rung starts from an empty card.
    ``TRINITY_DEBUG_MEMORY=1`` prints what still holds CUDA memory afterwards (to stderr)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if os.environ.get(DEBUG_MEMORY_ENV):
            report_live_cuda_tensors()


def report_live_cuda_tensors(top: int = 3, depth: int = 6) -> None:
    """Live CUDA tensors by total size, and for the largest few who refers to them (types only)."""
    import sys

    import torch

    def nbytes(t: torch.Tensor) -> int:
        try:
            return t.untyped_storage().nbytes()
        except Exception:  # noqa: BLE001  (functorch's batched tensors have no storage)
            return 0

    tensors = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.is_cuda and nbytes(obj):
                tensors.append(obj)
        except Exception:  # noqa: BLE001  (proxies that fail isinstance)
            continue
    total = sum(nbytes(t) for t in tensors) / 2**30
    print(f"[memory] allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB, {len(tensors)} live CUDA tensors "
          f"({total:.2f} GiB by storage)", file=sys.stderr, flush=True)
    frame = sys._getframe()
    for t in sorted(tensors, key=lambda t: -nbytes(t))[:top]:
        chain, obj, seen = [], t, {id(tensors), id(frame)}
        for _ in range(depth):
            refs = [r for r in gc.get_referrers(obj) if id(r) not in seen and r is not frame]
            if not refs:
                break
            obj = refs[0]
            seen.add(id(obj))
            name = type(obj).__name__
            if isinstance(obj, dict):
                name += "{" + ",".join(map(str, list(obj)[:4])) + "}"
            chain.append(name)
        print(f"[memory]   {tuple(t.shape)} {t.dtype}: " + " <- ".join(chain), file=sys.stderr, flush=True)


def injected_ooms() -> int:
    """Test seam: ``TRINITY_INJECT_OOM=N`` makes the first N attempts of a job raise
    ``torch.OutOfMemoryError`` at their first step (see README, "Test seams")."""
    raw = os.environ.get(INJECT_OOM_ENV, "").strip()
    return int(raw) if raw.isdigit() else 0
