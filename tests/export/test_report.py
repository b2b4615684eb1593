"""The report: base vs fine-tuned on the held-out split, export fidelity, generations, loss plot."""

from __future__ import annotations

import json

import pytest
import torch

from tests.export.export_helpers import EVAL_ROWS
from trinity_core.evaluate.run import _score_logits, prompt_and_reference, score_hf
from trinity_core.data.template import tokenize_conversation


def test_report_files(report, workdir):
    out = workdir / "report"
    assert json.loads((out / "report.json").read_text()) == report
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| fine_tuned |" in md and "| gguf_q4_k_m |" in md and "![loss](loss.png)" in md


def test_verdict_counts_what_the_prompts_show(report, workdir):
    """The export fixture's adapter is perturbed, not trained: whatever the outcome, the verdict is the
    count of the per-prompt outcomes and the report opens with it."""
    v, prompts = report["verdict"], report["prompts"]
    assert len(prompts) == v["prompts"] == 2 and all(set(p["models"]) == {"base", "fine_tuned", "gguf_q4_k_m"}
                                                     for p in prompts)
    counts = [sum(p["outcome"] == k for p in prompts) for k in ("win", "tie", "loss")]
    assert counts == [v["wins"], v["ties"], v["losses"]]
    assert v["outcome"] == ("better" if counts[0] > counts[2] else "worse" if counts[2] > counts[0] else "even")
    words = {"better": "beat the base", "worse": "did worse than the base", "even": "did not beat the base"}
    assert words[v["outcome"]] in (workdir / "report" / "report.md").read_text().splitlines()[2]


def test_scores_every_model_on_the_same_tokens(report, workdir, tokenizer):
    rows = [json.loads(line) for line in (workdir / "data" / "eval.jsonl").read_text().splitlines()]
    masks = [tokenize_conversation(tokenizer, r["messages"], 256)[1] for r in rows]
    n_tokens = sum(sum(m[1:]) for m in masks)
    models = report["models"]
    assert set(models) == {"base", "fine_tuned", "merged", "gguf_f16", "gguf_q4_k_m", "gguf_q8_0"}
    assert report["held_out"] == {"rows": EVAL_ROWS, "tokens": n_tokens}
    assert {m["tokens"] for m in models.values()} == {n_tokens}
    for m in models.values():
        assert m["perplexity"] == pytest.approx(2.718281828 ** m["loss"], rel=1e-3)


def test_export_fidelity(report):
    m = report["models"]
    tuned = m["fine_tuned"]["loss"]
    assert m["base"]["loss"] != pytest.approx(tuned, abs=1e-3)  # the adapter matters
    assert m["merged"]["loss"] == pytest.approx(tuned, abs=1e-4)  # merge into the NF4 base: exact
    assert m["merged"]["top1_agreement"] == 1.0
    assert m["gguf_f16"]["loss"] == pytest.approx(tuned, abs=2e-3)
    assert m["gguf_f16"]["top1_agreement"] >= 0.97
    assert m["gguf_q8_0"]["loss"] == pytest.approx(tuned, abs=0.02)
    assert m["gguf_q4_k_m"]["loss"] == pytest.approx(tuned, abs=0.1)


def test_caps_memory_and_merged_weights_in_the_report(report, export_spec):
    """Defaults from the spec; the small tiny model is scored merged too, and its weights match."""
    ex = export_spec.export
    caps = report["caps"]
    assert (caps["max_rows"], caps["max_tokens"], caps["max_seconds"]) == (ex.eval_max_rows, ex.eval_max_tokens,
                                                                           ex.eval_max_seconds) == (64, 512, 900)
    assert caps["rows_available"] == EVAL_ROWS and not caps["rows_capped"] and caps["stopped_on_time"] == []
    assert report["skipped"] == {} and report["merged_weights"]["ok"] and report["merged_weights"]["adapted"] == 42
    assert "load trained model" in report["memory"]["stages"] and report["memory"]["device"] == "cpu"


def test_generations_side_by_side(report, workdir):
    rows = [json.loads(line) for line in (workdir / "data" / "eval.jsonl").read_text().splitlines()]
    gens = report["generations"]
    assert len(gens) == 2
    for g, row in zip(gens, rows, strict=False):
        prompt, reference = prompt_and_reference(row["messages"])
        assert g["prompt"] == prompt[-1]["content"] and g["reference"] == reference
        assert isinstance(g["base"], str) and isinstance(g["fine_tuned"], str)


def test_training_summary(report):
    t = report["training"]
    assert t["steps"] == 30 and t["first_loss"] == pytest.approx(6.3) and t["min_loss"] == t["last_loss"]


def test_score_logits_masks_and_shifts():
    """Position i's logits predict token i+1; only tokens whose mask is 1 are scored."""
    ids, mask = [0, 1, 2, 3], [0, 0, 1, 1]
    logits = torch.full((4, 4), -30.0)
    logits[1, 2] = logits[2, 3] = 30.0  # confident and right on the two scored tokens
    nll, n, argmax = _score_logits(logits, ids, mask)
    assert n == 2 and nll == pytest.approx(0.0, abs=1e-6) and argmax == [2, 3]
    logits[2, 3], logits[2, 0] = -30.0, 30.0
    nll, n, argmax = _score_logits(logits, ids, mask)
    assert nll == pytest.approx(60.0, rel=1e-3) and argmax == [2, 0]


def test_score_hf_equals_the_training_loss(trained_model, tokenizer, workdir):
    """The held-out loss is what a causal-LM forward with assistant-only labels reports."""
    row = json.loads((workdir / "data" / "eval.jsonl").read_text().splitlines()[0])
    ids, mask = tokenize_conversation(tokenizer, row["messages"], 256)
    labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask, strict=True)]])
    with torch.no_grad():
        loss = trained_model(torch.tensor([ids]), labels=labels).loss.item()
    assert score_hf(trained_model, [(ids, mask)])["loss"] == pytest.approx(loss, abs=1e-5)
