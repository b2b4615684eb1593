import json
from pathlib import Path

import pytest

from trinity_core.errors import SpecError
from trinity_core.spec import ALL_PROJECTIONS, JobSpec, load_spec, parse_spec

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.y*ml")) + sorted(
    (Path(__file__).resolve().parents[2] / "examples").glob("*.json")
)


def test_defaults_are_the_seed_recipe():
    s = JobSpec()
    assert s.model.name_or_path == "unsloth/gemma-3-12b-it-bnb-4bit"
    assert s.model.max_seq_length == 4096
    assert (s.model.load_in_4bit, s.model.quant_type, s.model.double_quant) == (True, "nf4", True)
    assert (s.lora.r, s.lora.alpha, s.lora.use_rslora, s.lora.use_dora) == (64, 32, True, True)
    assert tuple(s.lora.target_modules) == ALL_PROJECTIONS
    t = s.train
    assert (t.batch_size, t.grad_accum, t.learning_rate, t.optim, t.lr_scheduler, t.max_steps) == (
        1, 4, 2e-4, "adamw_8bit", "cosine", 60)
    assert s.ladder.rungs == ["seq_2048", "r_32", "dora_off", "targets_qv"]
    assert s.export.quantizations == ["q4_k_m"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_parses(path):
    spec = load_spec(path, require_data=True)
    assert isinstance(spec, JobSpec)


def test_all_problems_reported_at_once():
    bad = {"lora": {"r": 0, "target_modules": ["q_proj", "nope"]}, "train": {"learning_rate": -1},
           "model": {"max_seq_length": 10**9}, "surprise": 1}
    with pytest.raises(SpecError) as e:
        parse_spec(bad)
    locs = {d["loc"] for d in e.value.details}
    assert {"lora.r", "lora.target_modules", "train.learning_rate", "model.max_seq_length", "surprise"} <= locs, locs
    assert "lora.r" in e.value.message


def test_near_miss_field_names_get_a_did_you_mean_at_every_level():
    bad = {"lora": {"rr": 8}, "train": {"learning_rat": 1e-4}, "lroa": {}, "model": {"colour": "red"}}
    with pytest.raises(SpecError) as e:
        parse_spec(bad)
    found = {d["loc"]: d for d in e.value.details}
    assert {loc: d.get("did_you_mean") for loc, d in found.items()} == {
        "lora.rr": "lora.r", "train.learning_rat": "train.learning_rate", "lroa": "lora", "model.colour": None}
    assert found["lora.rr"]["msg"] == "unknown field; did you mean lora.r?"
    assert "name_or_path" in found["model.colour"]["msg"]  # no near miss: the part's fields are listed
    assert "lora.rr: unknown field; did you mean lora.r?" in e.value.message


def test_yaml_and_json_load_the_same(tmp_path):
    data = {"model": {"max_seq_length": 512}, "data": {"path": "x.jsonl"}, "lora": {"r": 8}}
    (tmp_path / "s.json").write_text(json.dumps(data))
    (tmp_path / "s.yaml").write_text("model:\n  max_seq_length: 512\ndata:\n  path: x.jsonl\nlora:\n  r: 8\n")
    assert load_spec(tmp_path / "s.json") == load_spec(tmp_path / "s.yaml")


def test_broken_yaml_names_the_line(tmp_path):
    (tmp_path / "s.yaml").write_text("model:\n  max_seq_length: [1,\n")
    with pytest.raises(SpecError, match="line"):
        load_spec(tmp_path / "s.yaml")


def test_missing_dataset_is_reported():
    with pytest.raises(SpecError, match="data"):
        parse_spec({}, require_data=True)


def test_two_dataset_sources_are_refused():
    with pytest.raises(SpecError, match="one dataset source"):
        parse_spec({"data": {"path": "a.jsonl", "hub": "x/y"}})


def test_attention_kernel_is_chosen_by_the_spec(tiny_spec):
    """auto leaves the backend's choice (eager on CPU); an explicit kernel reaches the model, and
    an unknown one is refused naming the field."""
    from trinity_core.train.backends.peft import PeftBackend

    assert tiny_spec.model.attention == "auto"
    model, _ = PeftBackend().load(tiny_spec)
    assert model.config._attn_implementation == "eager"
    sdpa = tiny_spec.model_copy(deep=True)
    sdpa.model.attention = "sdpa"
    model, _ = PeftBackend().load(sdpa)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(SpecError, match=r"model\.attention"):
        parse_spec({"model": {"attention": "flash"}, "data": {"path": "x.jsonl"}})
