"""The verdict of the tiny recipe's real run: the fine-tune learned the data's short answers, so it beats
the random base on the held-out prompts, its replies end their turn in transformers and in the q4_k_m
GGUF under llama.cpp, and the report says so in its first lines."""

from __future__ import annotations

import json

import pytest

from trinity_core.evaluate.verdict import build_verdict, headline, outcome, text_metrics


def test_the_fine_tune_beats_the_base(trained_run):
    result, workdir, _ = trained_run
    v = result.report["verdict"]
    assert v["prompts"] == 4 and v["wins"] + v["ties"] + v["losses"] == 4
    assert v["outcome"] == "better" and v["wins"] > v["losses"]
    assert v["mean"]["fine_tuned"]["chrf"] > v["mean"]["base"]["chrf"] + 10
    assert v["held_out"]["loss_change"] < 0 and v["held_out"]["perplexity_change"] < 0
    assert json.loads((workdir / "report" / "report.json").read_text())["verdict"] == v


def test_metrics_are_the_libraries_own(trained_run):
    """Each prompt's numbers are sacrebleu's chrF and rouge-score's ROUGE-L, recomputed here."""
    from rouge_score import rouge_scorer
    from sacrebleu import sentence_chrf

    prompts = trained_run[0].report["prompts"]
    assert len(prompts) == 4
    for p in prompts:
        assert set(p["models"]) == {"base", "fine_tuned", "gguf_q4_k_m"}
        for m in p["models"].values():
            assert m["chrf"] == pytest.approx(sentence_chrf(m["text"], [p["reference"]]).score, abs=0.01)
            rouge = rouge_scorer.RougeScorer(["rougeL"]).score(p["reference"], m["text"])["rougeL"].fmeasure
            assert m["rouge_l"] == pytest.approx(rouge, abs=1e-4)
        assert p["outcome"] == outcome(p["models"]["fine_tuned"]["chrf"], p["models"]["base"]["chrf"])


def test_turn_endings_survive_export(trained_run):
    """The terminator is trained: the fine-tuned replies end their turn in transformers and in the q4_k_m
    GGUF in llama.cpp (llama.cpp stops on its own end-of-generation tokens: no stop strings given)."""
    v = trained_run[0].report["verdict"]
    s = v["stop_share"]
    assert s["terminator"] == "<end_of_turn>" and s["max_new_tokens"] == 24
    assert s["fine_tuned"]["share"] == 1.0 and s["gguf_q4_k_m"]["share"] == 1.0
    assert s["base"]["prompts"] == 4 and s["base"]["share"] < 1.0
    g = v["gguf"]
    assert g["model"] == "gguf_q4_k_m" and g["prompts"] == 4 and g["top1_agreement"] > 0.5


def test_report_opens_with_the_verdict_in_words(trained_run):
    _, workdir, events = trained_run
    md = (workdir / "report" / "report.md").read_text().splitlines()
    assert md[0] == "# Fine-tuning report"
    assert md[2].startswith("**The fine-tune beat the base on this data**: its reply was closer to the reference")
    assert md[3].startswith("Held-out loss ") and "perplexity" in md[3]
    assert md[4].startswith("Replies that ended their turn (<end_of_turn>) within 24 new tokens: base (transformers) ")
    assert "fine-tuned q4_k_m GGUF (llama.cpp) 4/4" in md[4]
    assert md[5].startswith("GGUF q4_k_m fidelity: held-out loss")
    assert any(e.message.startswith("The fine-tune beat the base") for e in events)


def test_text_metrics_on_known_strings():
    same = text_metrics("The capital of Peru is Lima.", "the capital of  Peru is Lima.")
    assert same["exact_match"] == 1.0 and same["rouge_l"] == 1.0
    wrong = text_metrics("zzz", "The capital of Peru is Lima.")
    assert wrong == {"chrf": pytest.approx(0.0, abs=1.0), "rouge_l": 0.0, "exact_match": 0.0}


def _prompt(base: float, tuned: float) -> dict:
    models = {n: {"text": n, "chrf": c, "rouge_l": 0.0, "exact_match": 0.0, "stopped": True}
              for n, c in (("base", base), ("fine_tuned", tuned))}
    return {"prompt": "q", "reference": "r", "models": models, "outcome": outcome(tuned, base)}


def test_the_verdict_says_worse_when_the_fine_tune_loses():
    prompts = [_prompt(50, 20), _prompt(50, 49.5), _prompt(10, 30), _prompt(40, 10)]
    v = build_verdict(prompts, {}, max_new_tokens=8)
    assert (v["wins"], v["ties"], v["losses"], v["outcome"]) == (1, 1, 2, "worse")
    assert headline(v)[0].startswith("**The fine-tune did worse than the base on this data**: ")
    even = build_verdict(prompts[:3], {}, max_new_tokens=8)
    assert even["outcome"] == "even" and "did not beat the base" in headline(even)[0]
    assert build_verdict([], {}, max_new_tokens=8)["outcome"] == "no_prompts"
