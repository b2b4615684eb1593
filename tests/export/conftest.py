"""One export for the whole session: a sharded tiny Gemma-3, a trained-ish adapter, merge -> GGUF
(f16, q4_k_m, q8_0) -> Modelfile, then the report. Tests read these outputs; the few that need
another merge (original weights, pre-quantised base) build it once more here, session-scoped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.export.export_helpers import EVAL_ROWS, FIDELITY, Events, perturb_adapter
from trinity_core.spec import JobSpec

ROOT = Path(__file__).resolve().parents[2]
PROBE_IDS_SEED = 0


@pytest.fixture(scope="session", autouse=True)
def print_fidelity():
    yield
    if FIDELITY:
        print("\nexport fidelity:", json.dumps(FIDELITY, indent=1))


@pytest.fixture(scope="session")
def sharded_base(tmp_path_factory) -> Path:
    """The tiny Gemma-3 (fp32) saved in 8 shards, so the merge really goes shard by shard."""
    from trinity_core.fixtures.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("export-base") / "model", max_shard_size="2MB")


@pytest.fixture(scope="session")
def export_spec(sharded_base) -> JobSpec:
    return JobSpec.model_validate({
        "name": "tiny-export",
        "model": {"name_or_path": str(sharded_base), "max_seq_length": 256},
        "lora": {"r": 16, "alpha": 32},
        "export": {"quantizations": ["q4_k_m", "q8_0"], "eval_prompts": 2, "max_new_tokens": 12},
    })


@pytest.fixture(scope="session")
def workdir(export_spec, tmp_path_factory) -> Path:
    """A job workdir holding ``adapter/`` in PEFT format, made with the real backend's loader, and
    ``data/eval.jsonl``. A/B are stored in bf16 (as TRL leaves them when it computes in bf16), the
    DoRA magnitudes in fp32, so the merge's dtype handling is exercised too."""
    from trinity_core.train.backends.peft import PeftBackend

    wd = tmp_path_factory.mktemp("job")
    model, _ = PeftBackend().load(export_spec)
    perturb_adapter(model)
    for name, module in model.named_modules():
        if name.endswith(("lora_A.default", "lora_B.default")):
            module.to(torch.bfloat16)
    model.save_pretrained(wd / "adapter")
    del model
    rows = [json.loads(line) for line in (ROOT / "examples/data/tiny-chat.jsonl").read_text().splitlines()]
    (wd / "data").mkdir()
    (wd / "data" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:EVAL_ROWS]))
    return wd


@pytest.fixture(scope="session")
def exported(export_spec, workdir):
    """``export_all`` run once: (result, events)."""
    from trinity_core.export.run import export_all

    events = Events()
    result = export_all(export_spec, workdir, emit=events)
    return result, events


@pytest.fixture(scope="session")
def tokenizer(sharded_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(sharded_base)


@pytest.fixture(scope="session")
def trained_model(export_spec, workdir):
    """The model as trained: 4-bit NF4 base + the adapter, fp32 compute."""
    from trinity_core.evaluate.run import load_trained_model

    return load_trained_model(export_spec.model.name_or_path, workdir / "adapter")


@pytest.fixture(scope="session")
def merged_model(exported, workdir):
    from trinity_core.evaluate.run import load_merged_model

    return load_merged_model(workdir / "merged")


@pytest.fixture(scope="session")
def probe_ids(tokenizer) -> list[int]:
    """A chat prompt plus random ids: what the logit comparisons run on."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of Peru?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(PROBE_IDS_SEED)
    return ids + torch.randint(7, len(tokenizer), (24,), generator=g).tolist()


@pytest.fixture(scope="session")
def report(exported, workdir, tokenizer, export_spec):
    """The report stage as the pipeline runs it, after the export."""
    from trinity_core.evaluate.run import evaluate_job

    result, _ = exported
    history = [{"step": s, "loss": 7.0 * 0.9**s, "lr": 2e-3 * min(1, s / 2)} for s in range(1, 31)]
    return evaluate_job(export_spec, workdir, export=result, tokenizer=tokenizer, loss_history=history)
