"""The job spec: one pydantic model whose defaults are the seed recipe.

A spec is what a user POSTs or writes in a YAML/JSON file. ``load_spec`` and ``parse_spec``
collect every problem and raise one :class:`SpecError` listing all of them; an unknown field name
close to a real one comes with a "did you mean" (``lora.rr`` → ``lora.r``).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trinity_core.errors import SpecError
from trinity_core.export.gguf import GGUF_TYPES

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_MODEL = "unsloth/gemma-3-12b-it-bnb-4bit"
MAX_SEQ_LENGTH_LIMIT = 131_072


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Part):
    """Which base model to fine-tune and how to load it."""

    name_or_path: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        description="Hub id (e.g. unsloth/gemma-3-12b-it-bnb-4bit) or a local model directory.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    max_seq_length: int = Field(
        4096, ge=16, le=MAX_SEQ_LENGTH_LIMIT, description="Longest training sequence, in tokens."
    )
    load_in_4bit: bool = Field(True, description="Quantise the base to 4 bits (QLoRA).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="bitsandbytes 4-bit data type.")
    double_quant: bool = Field(True, description="Quantise the quantisation constants too.")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Dtype of the matmuls. auto: bfloat16 on GPUs that support it, "
        "float16 on older GPUs (T4), float32 on CPU.",
    )
    backend: Literal["auto", "peft", "unsloth"] = Field(
        "auto", description="auto: unsloth when CUDA and the gpu extra are present, else peft."
    )
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward.")
    attention: Literal["auto", "eager", "sdpa", "flex_attention"] = Field(
        "auto",
        description="Attention kernel. auto: the backend's choice (peft: sdpa on CUDA, eager on CPU; "
        "unsloth: flex or sdpa where the card supports them). eager is what a T4 can rely on for "
        "Gemma-3's head_dim 256, and what the memory estimate assumes on the float32 path.",
    )


class DataSpec(_Part):
    """Where the training data comes from and how its fields map onto chat roles."""

    path: str | None = Field(
        None, description="Local file (JSON, JSONL, Parquet, CSV) or a datasets.save_to_disk directory."
    )
    dataset_id: str | None = Field(None, description="Id of a dataset uploaded with POST /datasets.")
    hub: str | None = Field(None, description="Hub dataset id, e.g. yahma/alpaca-cleaned.")
    config: str | None = Field(None, description="Hub dataset config/subset.")
    split: str = Field("train", description="Split to read from a hub or save_to_disk source.")
    revision: str | None = Field(None, description="Hub dataset revision.")
    format: Literal["auto", "alpaca", "conversations", "sharegpt", "messages"] = Field(
        "auto", description="Row format; auto detects it from the first rows."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map source field -> role field, e.g. {question: instruction, answer: output}.",
    )
    eval_path: str | None = Field(
        None, description="Separate eval file (same formats as data.path), used instead of a held-out "
        "split; its rows are validated like the training rows. Excludes eval_fraction."
    )
    eval_dataset_id: str | None = Field(
        None, description="Id of an uploaded dataset (POST /datasets) used as the eval rows instead of a "
        "held-out split. Excludes eval_fraction."
    )
    eval_fraction: float = Field(
        0.05, ge=0.0, lt=1.0,
        description="Share of training rows held out for eval; 0 (set for you) with eval_path/eval_dataset_id.",
    )
    eval_min_rows: int = Field(
        1, ge=0, description="Hold out at least this many rows; 0 (set for you) with eval_path/eval_dataset_id."
    )
    drop_invalid_rows: bool = Field(
        False, description="Skip invalid rows (reported) instead of failing the job."
    )
    turn_end_check: Literal["error", "warn"] = Field(
        "error", description="Rows whose trained labels miss the chat template's turn terminator "
        "(<end_of_turn>), so the model would not learn to stop: fail the job naming them (error), "
        "or list them in the data report as warnings and train anyway (warn)."
    )

    @model_validator(mode="before")
    @classmethod
    def _eval_file_or_split(cls, data: Any) -> Any:
        """An eval file replaces the held-out split: the split's fields default to 0 with one and must
        not ask for held-out rows (the stored spec then says 0, so it parses again unchanged)."""
        if not isinstance(data, dict) or not (data.get("eval_path") or data.get("eval_dataset_id")):
            return data
        asked = [f"{n}={data[n]!r}" for n in ("eval_fraction", "eval_min_rows") if data.get(n) not in (None, 0)]
        if asked:
            given = "eval_path" if data.get("eval_path") else "eval_dataset_id"
            raise ValueError(f"{given} is the eval set; a held-out split ({', '.join(asked)}) cannot be "
                             "asked for too: leave eval_fraction and eval_min_rows out or 0")
        return {**data, "eval_fraction": 0.0, "eval_min_rows": 0}

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        given = [n for n in ("path", "dataset_id", "hub") if getattr(self, n)]
        if len(given) > 1:
            raise ValueError(f"give one dataset source, not {' and '.join(given)}")
        if self.eval_path and self.eval_dataset_id:
            raise ValueError("give one eval source, not eval_path and eval_dataset_id")
        return self


class LoraSpec(_Part):
    """The adapter: LoRA with rank-stabilised scaling (rsLoRA) and weight decomposition (DoRA)."""

    r: int = Field(64, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(32, ge=1, le=4096, description="LoRA alpha; scaling is alpha/sqrt(r) with rsLoRA.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(ALL_PROJECTIONS), min_length=1, description="Projections to adapt."
    )
    use_rslora: bool = Field(True, description="Scale by alpha/sqrt(r) instead of alpha/r.")
    use_dora: bool = Field(True, description="Weight-decomposed LoRA (magnitude vector per layer).")

    @field_validator("target_modules")
    @classmethod
    def _known_targets(cls, targets: list[str]) -> list[str]:
        unknown = [t for t in targets if t not in ALL_PROJECTIONS]
        if unknown:
            raise ValueError(f"unknown target_modules {unknown}; choose from {list(ALL_PROJECTIONS)}")
        return list(dict.fromkeys(targets))


class TrainSpec(_Part):
    """Optimiser and schedule."""

    batch_size: int = Field(1, ge=1, le=1024, description="Per-device micro-batch size.")
    grad_accum: int = Field(4, ge=1, le=1024, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    optim: Literal["adamw_8bit", "paged_adamw_8bit", "adamw_torch"] = Field(
        "adamw_8bit", description="Optimizer (bitsandbytes 8-bit AdamW by default)."
    )
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field("cosine")
    warmup_steps: int = Field(5, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    max_steps: int = Field(60, ge=1, le=1_000_000, description="Optimizer steps.")
    seed: int = Field(3407, description="Seeds data shuffling, the eval split and LoRA init.")
    save_steps: int = Field(20, ge=1, description="Checkpoint every N optimizer steps.")
    save_total_limit: int = Field(
        2, ge=1, description="Keep the newest N checkpoints (and, with export.checkpoint=best, the best one too)."
    )
    eval_steps: int = Field(
        10, ge=0, le=1_000_000,
        description="Held-out loss every N optimizer steps and at the last step, each with a checkpoint "
        "(eval events, result.json eval_history); 0 turns evaluation during training off.",
    )
    eval_max_rows: int = Field(
        32, ge=1, le=100_000,
        description="Held-out rows scored at each evaluation during training: the first N of the seeded eval split.",
    )
    eval_max_tokens: int = Field(
        512, ge=16, le=131_072,
        description="Tokens scored per held-out row during training (a longer row is cut; also cut at the "
        "rung's max_seq_length).",
    )
    eval_max_seconds: float = Field(
        120.0, gt=0, le=86_400,
        description="Wall-clock budget of the first evaluation (at least one row); the rows it scored are "
        "the rows every later evaluation scores, so their losses compare.",
    )
    early_stopping_patience: int = Field(
        0, ge=0, le=10_000,
        description="Stop when this many evaluations in a row bring no new lowest eval loss; 0 (the recipe): "
        "off, all max_steps are trained. Needs eval_steps > 0.",
    )
    logging_steps: int = Field(1, ge=1)
    packing: bool = Field(False, description="Pack short rows into max_seq_length sequences.")


@dataclass(frozen=True)
class RungSettings:
    """The knobs the OOM ladder turns (``train/ladder.py`` walks the rungs). Everything else comes
    from the spec unchanged."""

    max_seq_length: int
    r: int
    use_dora: bool
    target_modules: tuple[str, ...]

    @classmethod
    def from_spec(cls, spec: JobSpec) -> RungSettings:
        return cls(max_seq_length=spec.model.max_seq_length, r=spec.lora.r, use_dora=spec.lora.use_dora,
                   target_modules=tuple(spec.lora.target_modules))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "target_modules": list(self.target_modules)}

    def apply(self, spec: JobSpec) -> JobSpec:
        """The spec with these settings written in (what actually runs)."""
        out = spec.model_copy(deep=True)
        out.model.max_seq_length = self.max_seq_length
        out.lora.r = self.r
        out.lora.use_dora = self.use_dora
        out.lora.target_modules = list(self.target_modules)
        return out


def _targets_qv(s: RungSettings) -> RungSettings:
    kept = tuple(t for t in s.target_modules if t in ("q_proj", "v_proj"))
    return replace(s, target_modules=kept or ("q_proj", "v_proj"))


# The one list of rungs, in the seed's order: name -> what it changes (cumulative).
RUNGS: dict[str, Callable[[RungSettings], RungSettings]] = {
    "seq_2048": lambda s: replace(s, max_seq_length=min(s.max_seq_length, 2048)),
    "r_32": lambda s: replace(s, r=min(s.r, 32)),
    "dora_off": lambda s: replace(s, use_dora=False),
    "targets_qv": _targets_qv,
}
RungName = Literal[tuple(RUNGS)]  # type: ignore[valid-type]  (built from RUNGS: one list of names)
GgufType = Literal[tuple(GGUF_TYPES)]  # type: ignore[valid-type]  (export/gguf.py's table)


class LadderSpec(_Part):
    """The OOM ladder: cheaper settings tried in order when a CUDA OOM strikes."""

    enabled: bool = True
    rungs: list[RungName] = Field(
        default_factory=lambda: list(RUNGS),
        description="Cumulative downgrades in order: seq 4096->2048, r 64->32, DoRA off, "
        "targets -> q_proj,v_proj.",
    )
    preflight: bool = Field(True, description="Skip rungs the memory estimate says cannot fit.")


class ExportSpec(_Part):
    """What to produce after training."""

    merge: bool = Field(True, description="Merge the adapter into the base (safetensors + tokenizer).")
    merge_into: Literal["dequantized", "original"] = Field(
        "dequantized",
        description="dequantized: the NF4 base that was trained (exact); original: 16-bit weights "
        "from export.original_model (differs by the NF4 rounding).",
    )
    original_model: str | None = Field(None, description="16-bit base for merge_into=original.")
    gguf: bool = Field(True, description="Convert the merged model to GGUF with llama.cpp.")
    quantizations: list[GgufType] = Field(
        default_factory=lambda: ["q4_k_m"], description="GGUF files to produce (f16 is always made)."
    )
    evaluate: bool = Field(True, description="Base vs fine-tuned report and export fidelity.")
    checkpoint: Literal["best", "last"] = Field(
        "best",
        description="Which step is exported (adapter, merged model, GGUF, report): best = the evaluated step "
        "with the lowest held-out loss during training; last = the final step. best without evaluation "
        "(train.eval_steps = 0) exports the last step, and result.json says why.",
    )
    eval_prompts: int = Field(4, ge=0, le=64, description="Prompts generated side by side.")
    max_new_tokens: int = Field(48, ge=1, le=2048)
    eval_max_rows: int = Field(
        64, ge=1, le=100_000,
        description="Held-out rows scored per model: the first N of the seeded eval split (the side-by-side "
        "prompts come from them too).",
    )
    eval_max_tokens: int = Field(
        512, ge=16, le=131_072,
        description="Tokens scored per held-out row (a longer row is cut, like training cuts at "
        "max_seq_length); a longer prompt is not generated from.",
    )
    eval_max_seconds: float = Field(
        900.0, gt=0, le=86_400,
        description="Wall-clock budget for scoring and generations, shared equally by the models still to "
        "score; each scores at least one row. The merged-weights check is not timed out.",
    )


class JobSpec(_Part):
    """A fine-tuning job. Every default is the seed recipe (Gemma-3-12B, QLoRA + rsLoRA + DoRA)."""

    name: str | None = Field(None, max_length=200, description="Free-form label.")
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    ladder: LadderSpec = Field(default_factory=LadderSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)

    @model_validator(mode="after")
    def _cross_checks(self) -> JobSpec:
        problems = []
        if self.export.merge_into == "original" and not self.export.original_model:
            problems.append("export.original_model is required when export.merge_into is 'original'")
        if self.export.gguf and not self.export.merge:
            problems.append("export.gguf needs export.merge (GGUF is made from the merged model)")
        if self.train.early_stopping_patience and not self.train.eval_steps:
            problems.append("train.early_stopping_patience needs train.eval_steps > 0 (it counts evaluations)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _loc(err: dict[str, Any]) -> str:
    parts = [str(p) for p in err["loc"] if not str(p).startswith("function-after")]
    return ".".join(parts) or "(spec)"


def spec_problems(error: ValidationError) -> list[dict[str, str]]:
    """Flatten a pydantic error into ``[{"loc": "lora.r", "msg": "..."}]``; an unknown field also
    gets ``did_you_mean`` when a field of its part is a near miss."""
    out = []
    for err in error.errors():
        problem = {"loc": _loc(err), "msg": err["msg"].removeprefix("Value error, ")}
        if err["type"] == "extra_forbidden":
            problem.update(_unknown_field(err["loc"]))
        out.append(problem)
    return out


def _unknown_field(loc: tuple[Any, ...]) -> dict[str, str]:
    """``{"msg", "did_you_mean"?}`` for an unknown field at ``loc`` (any nesting level)."""
    part: type[BaseModel] = JobSpec
    for name in loc[:-1]:  # walk down to the part that holds the field
        annotation = part.model_fields[str(name)].annotation if str(name) in part.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return {"msg": "unknown field"}
        part = annotation
    prefix = "".join(f"{name}." for name in loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), list(part.model_fields), n=1, cutoff=0.6)
    if close:
        return {"msg": f"unknown field; did you mean {prefix}{close[0]}?", "did_you_mean": prefix + close[0]}
    return {"msg": f"unknown field; {prefix.rstrip('.') or 'a spec'} has: {', '.join(part.model_fields)}"}


def parse_spec(data: dict[str, Any], *, require_data: bool = False) -> JobSpec:
    """Validate a spec dict, raising one SpecError that lists every problem."""
    if not isinstance(data, dict):
        raise SpecError("the spec must be a JSON/YAML object", details=[{"loc": "(spec)", "msg": "not an object"}])
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as e:
        problems = spec_problems(e)
        raise SpecError(
            f"{len(problems)} problem(s) in the job spec: "
            + "; ".join(f"{p['loc']}: {p['msg']}" for p in problems),
            details=problems,
            param=problems[0]["loc"],
        ) from None
    if require_data and not (spec.data.path or spec.data.dataset_id or spec.data.hub):
        raise SpecError(
            "data: give a dataset (data.path, data.dataset_id or data.hub)",
            details=[{"loc": "data", "msg": "no dataset source"}],
            param="data",
        )
    return spec


def load_spec(path: str | Path, *, require_data: bool = True) -> JobSpec:
    """Load a spec from a .json or YAML file. Relative data/model paths resolve against it."""
    path = Path(path)
    spec = parse_spec(read_spec_file(path), require_data=require_data)
    return _resolve_paths(spec, path.parent)


def read_spec_file(path: Path) -> Any:
    """The parsed content of a .json (else YAML) spec file; an empty file is ``{}``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"cannot read spec file {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError carry line and column in str(e)
        raise SpecError(f"cannot parse {path}: {e}") from None
    return {} if data is None else data


def _resolve_paths(spec: JobSpec, base: Path) -> JobSpec:
    def resolve(p: str | None) -> str | None:
        if p is None:
            return None
        candidate = (base / p) if not Path(p).is_absolute() else Path(p)
        return str(candidate.resolve()) if candidate.exists() else p

    spec = spec.model_copy(deep=True)
    spec.data.path = resolve(spec.data.path)
    spec.data.eval_path = resolve(spec.data.eval_path)
    if spec.model.name_or_path.startswith((".", "/")):
        spec.model.name_or_path = resolve(spec.model.name_or_path) or spec.model.name_or_path
    return spec
