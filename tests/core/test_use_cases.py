"""Each of the seed's use cases, with its own field names, mapped in the spec and trained a few
steps on the tiny Gemma-3 through run_job (issue 3: no preprocessing script needed)."""

import pytest

from tests.data.cases import USE_CASES, rows_for, write_jsonl
from tests.helpers import make_spec
from trinity_core.pipeline import run_job

# The mapping a user writes in the spec (auto-detection would find the same; see tests/data).
COLUMNS = {
    "code": {},
    "chat": {},
    "medical": {"question": "instruction", "answer": "output"},
    "creative": {"prompt": "instruction", "story": "output"},
    "reasoning": {"problem": "instruction", "solution": "output"},
    "sharegpt": {},
}


@pytest.mark.parametrize("case", list(COLUMNS))
def test_use_case_trains(case, tiny_spec, tmp_path):
    path = write_jsonl(tmp_path / f"{case}.jsonl", rows_for(case))
    spec = make_spec(tiny_spec, **{"data.path": str(path), "data.columns": COLUMNS[case],
                                   "train.max_steps": 2, "train.batch_size": 4, "train.save_steps": 100,
                                   "export.merge": False, "export.gguf": False, "export.evaluate": False})
    result = run_job(spec, tmp_path / "work", None)
    assert result.status == "succeeded" and result.global_step == 2
    assert result.data["format"] == USE_CASES[case][1]
    assert result.data["train_rows"] + result.data["eval_rows"] == len(rows_for(case))
    assert all(h["loss"] > 0 for h in result.loss_history)
