"""The memory estimate: its arithmetic, its fit to the GPU measurements, and the rung it picks."""

from __future__ import annotations

import pytest

from trinity_core import gpu
from trinity_core.train import ladder
from trinity_core.train import memory
from trinity_core.spec import ALL_PROJECTIONS, JobSpec

GEMMA3_12B = dict(hidden_size=3840, intermediate_size=15360, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=256, vocab_size=262208, num_hidden_layers=48, tie_word_embeddings=True,
                  model_type="gemma3_text")
T4_GIB = 15.1

# IN-SAMPLE rows: the constants in trinity_core/train/memory.py were fitted on these rows, so the ±10% check
# below shows the fit, not how well the estimate predicts a configuration it has not seen (for that,
# see OUT_OF_SAMPLE further down). Peak max_memory_allocated (GiB) measured with bench/gpu_bench.py,
# 2026-11-25/26 (docs/BENCHMARKS.md, raw rows in bench/results/*.jsonl):
# (card, backend, layers, seq, r, targets, dora, t4 path, grad accum, measured). Batch 1, gradient
# checkpointing, 8-bit AdamW; "fast" = trinity_core.train.fast_dora.linear, "peft" = PEFT's own DoRA. 48-layer rows
# were measured directly (the 4-layer model's layers repeated), not extrapolated. The plain-peft
# "fast" rows of 2026-11-25 and the H100 peft 48-layer 23.254 row ran earlier fast-DoRA versions
# (v1/v2); on plain peft the logits peak hides the DoRA layer's transient, so they stay in the fit.
# `python bench/estimate_check.py` prints every row with its error (kept output:
# bench/results/2026-11-28-cpu-estimate_check.txt).
MEASURED = [
    ('H100', 'peft', 2, 4096, 64, 'all7', 'none', False, 1, 14.358),
    ('H100', 'peft', 2, 4096, 64, 'all7', 'peft', False, 1, 14.387),
    ('H100', 'peft', 2, 2048, 32, 'qv', 'none', False, 1, 8.225),
    ('H100', 'peft', 4, 4096, 64, 'all7', 'none', False, 1, 14.693),
    ('H100', 'peft', 4, 4096, 64, 'all7', 'peft', False, 1, 14.782),
    ('H100', 'peft', 4, 2048, 32, 'qv', 'none', False, 1, 8.474),
    ('H100', 'peft', 48, 4096, 64, 'all7', 'none', False, 1, 22.217),
    ('H100', 'peft', 48, 4096, 64, 'all7', 'peft', False, 1, 23.61),
    ('H100', 'unsloth', 2, 4096, 64, 'all7', 'none', False, 1, 3.682),
    ('H100', 'unsloth', 4, 4096, 64, 'all7', 'none', False, 1, 4.0),
    ('H100', 'unsloth', 2, 4096, 64, 'all7', 'peft', False, 1, 6.355),
    ('H100', 'unsloth', 4, 4096, 64, 'all7', 'peft', False, 1, 6.712),
    ('H100', 'unsloth', 2, 4096, 64, 'all7', 'none', True, 1, 5.191),
    ('H100', 'unsloth', 4, 4096, 64, 'all7', 'none', True, 1, 5.526),
    ('H100', 'unsloth', 2, 4096, 64, 'all7', 'peft', True, 1, 7.956),
    ('H100', 'unsloth', 4, 4096, 64, 'all7', 'peft', True, 1, 8.292),
    ('H200', 'peft', 2, 4096, 64, 'all7', 'none', False, 1, 14.358),
    ('H200', 'peft', 2, 4096, 64, 'all7', 'fast', False, 1, 14.359),
    ('H200', 'peft', 2, 4096, 64, 'all7', 'fast', False, 4, 14.401),
    ('H200', 'peft', 2, 4096, 64, 'all7', 'peft', False, 1, 14.387),
    ('H200', 'peft', 2, 2048, 32, 'qv', 'none', False, 1, 8.225),
    ('H200', 'peft', 2, 2048, 64, 'all7', 'fast', False, 1, 8.282),
    ('H200', 'peft', 4, 4096, 64, 'all7', 'none', False, 1, 14.693),
    ('H200', 'peft', 4, 4096, 64, 'all7', 'fast', False, 1, 14.696),
    ('H200', 'peft', 4, 4096, 64, 'all7', 'fast', False, 4, 14.78),
    ('H200', 'peft', 4, 4096, 64, 'all7', 'peft', False, 1, 14.782),
    ('H200', 'peft', 4, 2048, 32, 'qv', 'none', False, 1, 8.474),
    ('H200', 'peft', 4, 2048, 64, 'all7', 'fast', False, 1, 8.59),
    ('H200', 'peft', 48, 4096, 64, 'all7', 'none', False, 1, 22.217),
    ('H200', 'peft', 48, 4096, 64, 'all7', 'fast', False, 1, 22.25),
    ('H200', 'unsloth', 2, 4096, 64, 'all7', 'none', False, 1, 3.682),
    ('H200', 'unsloth', 4, 4096, 64, 'all7', 'none', False, 1, 4.0),
    ('H200', 'unsloth', 2, 4096, 64, 'all7', 'none', True, 1, 5.191),
    ('H200', 'unsloth', 4, 4096, 64, 'all7', 'none', True, 1, 5.526),
    ('H200', 'unsloth', 2, 4096, 64, 'all7', 'peft', True, 1, 7.956),
    ('H200', 'unsloth', 4, 4096, 64, 'all7', 'peft', True, 1, 8.292),
    ('H200', 'unsloth', 2, 4096, 64, 'all7', 'peft', False, 1, 6.497),
    ('H200', 'unsloth', 4, 4096, 64, 'all7', 'peft', False, 1, 6.833),
    # 2026-11-26, H100, batch 1 × accumulation 4 (bench/results/2026-11-26-h100-*48*.jsonl)
    ('H100', 'unsloth', 48, 4096, 64, 'all7', 'none', False, 4, 11.171),
    ('H100', 'unsloth', 48, 4096, 64, 'all7', 'none', True, 4, 12.363),
    ('H100', 'peft', 48, 4096, 64, 'all7', 'none', False, 4, 23.201),
    ('H100', 'peft', 48, 4096, 64, 'all7', 'fast', False, 4, 23.254),
    # 2026-11-26 (second session), H100, fast DoRA v3 (gated MLP, batched refresh), accumulation 4
    # (bench/results/2026-11-26-h100-*-v3*.jsonl)
    ('H100', 'unsloth', 48, 4096, 64, 'all7', 'fast', False, 4, 11.216),
    ('H100', 'unsloth', 48, 4096, 64, 'all7', 'peft', False, 4, 13.926),
    # (the T4 path's fast-DoRA rows of that run, 12.203 GiB at 48 layers and 4.977 at 4, measured code that
    # no longer runs: they are replaced by the 2026-11-29 rows at the end)
    ('H100', 'unsloth', 4, 4096, 64, 'all7', 'peft', True, 4, 8.295),
    ('H100', 'unsloth', 4, 4096, 64, 'all7', 'peft', False, 4, 6.715),
    ('H100', 'peft', 48, 4096, 64, 'all7', 'fast', False, 4, 23.258),
    # 2026-11-29, H200, the T4 path's fast DoRA with the cast path, lean norms and lean attention, accumulation 4:
    # one process per row (bench/results/2026-11-29-h200-t4attn-3-t4mem.jsonl); T4_FAST_* in memory.py fit these
    ('H200', 'unsloth', 4, 4096, 64, 'all7', 'fast', True, 4, 3.839),
    ('H200', 'unsloth', 48, 4096, 64, 'all7', 'fast', True, 4, 10.934),
    ('H200', 'unsloth', 4, 8192, 64, 'all7', 'fast', True, 4, 5.219),
    ('H200', 'unsloth', 48, 8192, 64, 'all7', 'fast', True, 4, 12.374),
]


IN_SAMPLE_TOL = 0.10

# OUT-OF-SAMPLE rows: measured with the same bench/gpu_bench.py loop, not in MEASURED, so the constants
# were not fitted on them (same tuple, plus the raw file). Only code that still runs: LoRA, PEFT's
# DoRA and fast DoRA v3; the fast-DoRA v1/v2 rows of the raw files measure code that is gone (listed
# by bench/estimate_check.py with that reason). Most are near neighbours of fitted rows (accumulation 4
# where the fit has 1, 2/4 layers from another call, the other card, Unsloth's compiled mode), so they
# test the accumulation and depth terms more than new shapes; the run_job rows below are further away.
OUT_OF_SAMPLE = [
    ('H100', 'peft', 2, 4096, 64, 'all7', 'none', False, 4, 14.399, '2026-11-26-h100-peft.jsonl'),
    ('H100', 'peft', 4, 4096, 64, 'all7', 'none', False, 4, 14.776, '2026-11-26-h100-peft.jsonl'),
    ('H100', 'peft', 4, 4096, 64, 'all7', 'none', False, 4, 14.777, '2026-11-26-h100-peft48*.jsonl'),
    ('H100', 'peft', 2, 4096, 64, 'all7', 'peft', False, 4, 14.43, '2026-11-26-h100-peft.jsonl'),
    ('H100', 'peft', 4, 4096, 64, 'all7', 'peft', False, 4, 14.867, '2026-11-26-h100-peft.jsonl'),
    ('H100', 'peft', 4, 4096, 64, 'all7', 'fast', False, 4, 14.78, '2026-11-26-h100-peft48-v3.jsonl'),
    ('H100', 'unsloth', 2, 4096, 64, 'all7', 'none', False, 4, 3.723, '2026-11-26-h100-unsloth.jsonl'),
    ('H100', 'unsloth', 4, 4096, 64, 'all7', 'none', False, 4, 4.04, '2026-11-26-h100-unsloth*.jsonl'),
    ('H100', 'unsloth', 2, 4096, 64, 'all7', 'peft', False, 4, 6.396, '2026-11-26-h100-unsloth.jsonl'),
    ('H100', 'unsloth', 4, 4096, 64, 'all7', 'peft', False, 4, 6.773, '2026-11-26-h100-unsloth.jsonl'),
    ('H100', 'unsloth', 4, 4096, 64, 'all7', 'fast', False, 4, 4.048, '2026-11-26-h100-unsloth48-v3*.jsonl'),
    ('H100', 'unsloth', 4, 4096, 64, 'all7', 'none', True, 4, 5.174, '2026-11-26-h100-unsloth48_t4*.jsonl'),
    ('H200', 'unsloth', 4, 4096, 64, 'all7', 'none', False, 4, 4.04, '2026-11-26-h200-unsloth48-v2a.jsonl'),
    ('H200', 'unsloth', 48, 4096, 64, 'all7', 'none', False, 4, 11.171, '2026-11-26-h200-unsloth48-v2a.jsonl'),
    ('H200', 'unsloth+compile', 4, 4096, 64, 'all7', 'none', False, 4, 3.732, '2026-11-26-h200-compiled.jsonl'),
    # Trinity's compiled decoder layers (fast DoRA inside, the NF4 projections dequantised by its kernel and kept for
    # the layer's backward): the default since 2026-11-29, estimated with them; the rows above ran without
    ('H200', 'unsloth+layers', 48, 4096, 64, 'all7', 'fast', False, 4, 11.33, '2026-11-29-h200-speed-18.jsonl'),
    # since call 22 the gated MLP's activation runs its Triton kernels inside the layers (fast_dora.mlp.REGION_KERNELS):
    # 0.3 GiB less at the peak (the row above is that run's --region-torch-act row, 11.348); the estimate is +2%
    ('H200', 'unsloth+layers', 48, 4096, 64, 'all7', 'fast', False, 4, 11.033, '2026-11-29-h200-speed-22.jsonl'),
]
# estimate / measured - 1 on these rows, as measured when they were added (2026-11-28): -4.7% (Unsloth
# bf16 fast DoRA v3, 4 layers) .. +6.5% (Unsloth compiled LoRA, which the estimate does not model),
# median |error| 1.1%. Not ±10% by choice: this is the range they showed, rounded out to whole percents.
OUT_OF_SAMPLE_TOL = (-0.05, 0.07)

# run_job's own training loop (Unsloth backend, the T4 path: fp16 requested → fp32, eager attention,
# batch 1 × accumulation 4, 12B shape at 4 layers, H100) in the GPU ladder test, which records the
# job's pre-flight estimate next to its measured peak (result.json's peak_mem_gib =
# max_memory_allocated of the process that finished). Both ladder runs (…-v3.json and …-v3-first.json)
# measured the same peaks. Job C's rows are ~3,800 tokens (seq 4096 is the cap, not the length), the
# seq_2048 rung's rows are cut at 2048. Tuple as above, then the raw file, then the estimate the job
# recorded (None: pre-flight was off).
RUN_JOB = [
    ('H100', 'unsloth', 4, 2048, 64, 'all7', 'peft', True, 4, 5.168,
     '2026-11-26-h100-ladder-v3.json job A, seq_2048', None),
    ('H100', 'unsloth', 4, 2048, 64, 'all7', 'peft', True, 4, 5.168,
     '2026-11-26-h100-ladder-v3.json job B, seq_2048', 5.51),
]
# (Job C, the recipe with fast DoRA on the T4 path, 4.435 GiB measured, ran code that no longer runs: the
# cast path, lean norms and lean attention of 2026-11-29 came after; run_job on that code is not measured.)
# As measured (2026-11-28): +6.5% (PEFT's DoRA, seq 2048) and +18.2% (fast DoRA, the recipe): in
# run_job's loop the estimate over-predicts, by more than the fit's ±10% for fast DoRA. Over-prediction
# is the safe side for OOMs, but 18% at 4 layers is ~0.8 GiB: on a real T4 the pre-flight can skip a
# rung that would have fit. The GPU runs listed in docs/BENCHMARKS.md would say more (48 layers, other
# rungs). Stated as found, rounded out:
RUN_JOB_TOL = (0.0, 0.20)

# Out of memory: the peak was at least the figure given (allocated when it failed, plus the failed
# request where the error message states both), so the estimate must be at least that.
OOM_LOWER_BOUNDS = [
    ('H100', 'unsloth', 48, 4096, 64, 'all7', 'peft', True, 4, 14.634,
     '2026-11-26-h100-unsloth48_t4-v3.jsonl t4_dora_peft_acc4: oom, peak_alloc_gib at the failure'),
    ('H100', 'unsloth', 4, 8192, 64, 'all7', 'peft', True, 4, round(7.27 + 458 / 1024, 3),
     '2026-11-26-h100-ladder-v3.json job A, recipe: oom, 7.27 GiB allocated + 458 MiB requested'),
]


# Without gradient checkpointing (2026-11-30, H200, the 12B's layer pattern at 48 layers: 40 sliding, 8 global;
# batch 1 × accumulation 4; bench/results/2026-11-30-h200-nockpt-56.jsonl, call 56): Unsloth's compiled LoRA,
# which NO_CHECKPOINTING_SAVED_PER_LAYER is fitted on, and Trinity's compiled layers (LoRA), whose 20.1 GiB more
# are every layer's kept dequantised projections, counted from the shapes and not fitted.
NO_CHECKPOINTING = [
    ('H200', 'unsloth+compile', 48, 4096, 64, 'all7', 'none', False, 4, 43.104),
    ('H200', 'unsloth+layers', 48, 4096, 64, 'all7', 'none', False, 4, 63.221),
]


def _spec(seq=4096, r=64, targets="all7", dora="none", t4=False, accum=1, checkpointing=True) -> JobSpec:
    return JobSpec.model_validate({
        "model": {"max_seq_length": seq, "compute_dtype": "float16" if t4 else "bfloat16",
                  "gradient_checkpointing": checkpointing},
        "lora": {"r": r, "use_dora": dora != "none",
                 "target_modules": list(ALL_PROJECTIONS) if targets == "all7" else ["q_proj", "v_proj"]},
        "train": {"grad_accum": accum}})


def estimate_gib(row) -> float:
    """memory.estimate for a row of the lists above (a compiled-mode row is estimated as uncompiled:
    the estimate does not model Unsloth's compile; Trinity's compiled layers only where the row ran them)."""
    _, backend, layers, seq, r, targets, dora, t4, accum = row[:9]
    return memory.estimate(dict(GEMMA3_12B, num_hidden_layers=layers), _spec(seq, r, targets, dora, t4, accum),
                           backend.split("+")[0], fast_dora=dora != "peft",
                           compiled_layers=backend == "unsloth+layers").gib


def _row_id(r) -> str:
    return f"{r[0]}-{r[1]}-L{r[2]}-s{r[3]}-r{r[4]}-{r[5]}-{r[6]}{'-t4' if r[7] else ''}-acc{r[8]}"


@pytest.mark.parametrize("row", MEASURED, ids=_row_id)
def test_within_ten_percent_of_measured_peak(row):
    """In-sample: the fit itself."""
    _, backend, layers, seq, r, targets, dora, t4, accum, measured = row
    est = memory.estimate(dict(GEMMA3_12B, num_hidden_layers=layers), _spec(seq, r, targets, dora, t4, accum),
                          backend, fast_dora=dora != "peft", compiled_layers=False)  # none of them ran those
    assert abs(est.gib / measured - 1) <= IN_SAMPLE_TOL, (est.to_dict(), measured)


@pytest.mark.parametrize("row", OUT_OF_SAMPLE, ids=_row_id)
def test_out_of_sample_rows_within_their_measured_error(row):
    """Out-of-sample, the same benchmark loop: the tolerance is the error range these rows showed
    when they were added (bench/results/2026-11-28-cpu-estimate_check.txt), not a target."""
    err = estimate_gib(row) / row[9] - 1
    assert OUT_OF_SAMPLE_TOL[0] <= err <= OUT_OF_SAMPLE_TOL[1], (row, err)


@pytest.mark.parametrize("row", RUN_JOB, ids=lambda r: r[10])
def test_run_job_peaks_against_the_estimate(row):
    """Out-of-sample, run_job's own loop (the constants were fitted on bench/gpu_bench.py's loop).
    The estimate over-predicts it; the tolerance states how far, as measured."""
    # row[11], the estimate the job recorded, came from memory.py before the v3 recalibration (job C:
    # 5.83 then, as memory.py at 975111f gives; 5.24 now); the error is taken with today's constants
    err = estimate_gib(row) / row[9] - 1
    assert RUN_JOB_TOL[0] <= err <= RUN_JOB_TOL[1], (row, err)


@pytest.mark.parametrize("row", OOM_LOWER_BOUNDS, ids=lambda r: r[10][:40])
def test_estimate_is_not_below_a_measured_oom(row):
    assert estimate_gib(row) >= row[9], row


@pytest.mark.parametrize("row", NO_CHECKPOINTING, ids=_row_id)
def test_without_checkpointing(row):
    """Every layer's activations (fitted on the first row) and, with the compiled layers, every layer's kept
    dequantised projections (counted: the second row is not in the fit) within 2% of the measured peaks."""
    _, backend, layers, seq, r, targets, dora, t4, accum, measured = row
    layers_on = backend == "unsloth+layers"
    est = memory.estimate(dict(GEMMA3_12B, num_hidden_layers=layers),
                          _spec(seq, r, targets, dora, t4, accum, checkpointing=False), "unsloth",
                          compiled_layers=layers_on)
    assert abs(est.gib / measured - 1) <= 0.02, (est.to_dict(), measured)
    linear = sum(i * o for i, o in memory.projection_shapes(memory._shapes(GEMMA3_12B)).values())
    kept = est.parts.get("kept_projections", 0.0) * memory.GIB
    assert kept == pytest.approx(48 * linear * 2 if layers_on else 0.0)


def test_enough_variants_are_calibrated():
    variants = {row[1:9] for row in MEASURED}
    assert len(variants) >= 6 and any(row[2] == 48 for row in MEASURED)


def test_arithmetic_of_the_parts():
    est = memory.estimate(GEMMA3_12B, _spec(dora="fast"), "unsloth")
    proj = memory.projection_shapes(memory._shapes(GEMMA3_12B))
    linear = sum(i * o for i, o in proj.values())
    assert linear == 224_133_120  # one 12B decoder layer's 7 projections
    embedding = 262208 * 3840 * 2  # bf16, tied
    assert est.parts["weights"] * memory.GIB == pytest.approx(48 * linear * (0.5 + 1 / 64) + embedding)
    lora = 64 * sum(i + o for i, o in proj.values()) + sum(o for _, o in proj.values())  # + DoRA magnitudes
    assert lora == 64 * 85248 + 46592
    assert est.parts["adapter"] * memory.GIB == pytest.approx(48 * lora * (4 + 2))  # fp32 params + 8-bit Adam
    with_accum = memory.estimate(GEMMA3_12B, _spec(dora="fast", accum=4), "unsloth")
    assert with_accum.gib == pytest.approx(est.gib)  # grads are alive at a layer's backward peak anyway
    eager = memory.estimate(GEMMA3_12B, _spec(dora="fast"), "unsloth", compiled_layers=False)
    # the compiled layers keep one layer's 7 dequantised bf16 projections through its backward
    assert (est.parts["transient"] - eager.parts["transient"]) * memory.GIB == pytest.approx(linear * 2)
    assert est.assumptions["compiled_layers"] and "compiled_layers" not in eager.assumptions
    t4 = memory.estimate(GEMMA3_12B, _spec(dora="fast", t4=True), "unsloth")
    assert t4.gib == memory.estimate(GEMMA3_12B, _spec(dora="fast", t4=True), "unsloth", compiled_layers=False).gib
    plain, plain_accum = (memory.estimate(GEMMA3_12B, _spec(dora="fast", accum=a), "peft") for a in (1, 4))
    assert "accumulated_grads" not in plain.parts  # the logits peak comes before this micro-batch's grads
    assert plain_accum.parts["accumulated_grads"] * memory.GIB == pytest.approx(48 * lora * 4)


def test_logits_dominate_plain_peft_and_not_unsloth():
    plain = memory.estimate(GEMMA3_12B, _spec(), "peft")
    fused = memory.estimate(GEMMA3_12B, _spec(), "unsloth")
    assert plain.assumptions["transient"] == "logits and loss"
    assert plain.parts["transient"] == pytest.approx(3.05 * 4096 * 262208 * 4 / memory.GIB)  # ~12.2 GiB
    assert fused.assumptions["transient"] == "a layer's recompute and backward"
    assert plain.gib - fused.gib > 10


def test_t4_path_is_fp32_only_for_unsloth_gemma3():
    spec = _spec(t4=True)
    assert memory.activation_bytes(spec, "unsloth", "gemma3_text") == 4
    assert memory.activation_bytes(spec, "peft", "gemma3_text") == 2
    assert memory.activation_bytes(_spec(), "unsloth", "gemma3_text") == 2
    assert memory.activation_bytes(_spec(), "unsloth", "llama", bf16_supported=False) == 2


def test_reads_transformers_and_multimodal_configs():
    from transformers import Gemma3TextConfig

    text = Gemma3TextConfig(**{k: v for k, v in GEMMA3_12B.items() if k != "model_type"})
    a = memory.estimate(text, _spec(), "unsloth")
    b = memory.estimate({"text_config": GEMMA3_12B}, _spec(), "unsloth")
    assert a.gib == pytest.approx(b.gib)


def test_t4_fast_dora_without_the_lean_attention():
    """RunOptions(lean_attention=False) keeps Unsloth's fp32 attention: measured in the same run as the rows
    above (bench/results/2026-11-29-h200-t4attn-3-t4mem.jsonl, stock_attention_*)."""
    for layers, measured in ((4, 4.215), (48, 11.31)):
        est = memory.estimate(dict(GEMMA3_12B, num_hidden_layers=layers), _spec(4096, 64, "all7", "fast", True, 4),
                              "unsloth", lean_attention=False)
        assert abs(est.gib / measured - 1) <= IN_SAMPLE_TOL, (est.to_dict(), measured)
        assert est.assumptions["lean_attention"] is False


def test_fits_keeps_a_margin():
    assert memory.Estimate(14.0).fits(15.1)
    assert not memory.Estimate(14.7).fits(15.1)  # 14.7 + 0.735 > 15.1


def test_t4_rung_choice():
    """Under a T4's 15.1 GiB: Unsloth + fast DoRA runs the recipe itself; with PEFT's DoRA the
    recipe is predicted over (15.7 GiB, measured 2026-11-25 extrapolation) and seq 2048 is the
    first rung that fits; plain PEFT (the 262k-vocab logits) fits only the last, q,v at seq 2048."""
    spec = _spec(dora="fast", t4=True, accum=4)
    rungs = ladder.rungs(spec)
    assert memory.pick_rung(rungs, spec, GEMMA3_12B, "unsloth", T4_GIB) == 0
    long = _spec(seq=8192, dora="fast", t4=True, accum=4)  # a rung above the recipe (12.37 GiB measured)
    assert memory.pick_rung(ladder.rungs(long), long, GEMMA3_12B, "unsloth", T4_GIB) == 0
    plan = memory.plan(rungs, spec, GEMMA3_12B, "unsloth", T4_GIB, fast_dora=False)
    assert [p.fits for p in plan][:2] == [False, True]
    assert memory.pick_rung(rungs, spec, GEMMA3_12B, "unsloth", T4_GIB, fast_dora=False) == 1
    plain = memory.plan(rungs, spec, GEMMA3_12B, "peft", T4_GIB)
    assert [p.fits for p in plain] == [False] * (len(rungs) - 1) + [True]


def test_estimates_fall_down_the_ladder():
    """Every rung is cheaper than the one before, except turning fast DoRA off: since fast DoRA v3 a DoRA layer's
    peak is LoRA's (measured within ±0.2 GiB at 48 layers), so that rung saves ~nothing, with the compiled layers
    (the default; a LoRA job runs them too since 2026-11-30, keeping the same dequantised projections) or
    without."""
    spec = _spec(dora="fast", accum=4)
    for compiled_layers in (True, False):
        plan = memory.plan(ladder.rungs(spec), spec, GEMMA3_12B, "unsloth", 80.0, compiled_layers=compiled_layers)
        for before, after in zip(plan, plan[1:]):
            if after.name == "dora_off":
                assert abs(after.estimate.gib - before.estimate.gib) < 0.25, (before, after)
            else:
                assert after.estimate.gib < before.estimate.gib, (before, after)
    peft_dora = memory.plan(ladder.rungs(spec), spec, GEMMA3_12B, "unsloth", 80.0, fast_dora=False)
    gibs = [p.estimate.gib for p in peft_dora]
    assert gibs == sorted(gibs, reverse=True)


def test_no_cuda_means_no_preflight(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.budget_gib() is None
    assert memory.preflight(JobSpec(), "peft") is None


def test_ladder_skips_rungs_the_estimate_rules_out(tiny_spec, tmp_path, monkeypatch):
    """ladder.walk asks memory.preflight before each rung but the last; a rung
    predicted not to fit is recorded as skipped (with its estimate) and never loaded."""
    from tests.helpers import make_spec
    from trinity_core.pipeline import run_job

    def fake_preflight(spec, backend, *, fast_dora=True, lean_attention=True, compiled_layers=True):
        need = 20.0 if spec.model.max_seq_length > 2048 else 10.0
        return memory.Estimate(need, {"transient": need}), 15.1

    monkeypatch.setattr(memory, "preflight", fake_preflight)
    spec = make_spec(tiny_spec, **{"model.max_seq_length": 4096, "train.max_steps": 1, "train.save_steps": 100,
                                   "export.merge": False, "export.gguf": False, "export.evaluate": False})
    events = []
    result = run_job(spec, tmp_path, events.append)
    assert [(a["rung"], a["outcome"], a["estimate_gib"]) for a in result.attempts] == [
        ("recipe", "skipped", 20.0), ("seq_2048", "ok", 10.0)]
    assert result.attempts[0]["extra"]["budget_gib"] == 15.1
    assert any("skipped" in e.message for e in events if e.level == "warning")


def test_a_failed_attempt_is_released_before_the_next_rung_loads(tiny_spec, tmp_path, monkeypatch):
    """Seen on the GPU (2026-11-25): freeing inside the ``except`` block released nothing (the
    error's traceback holds the failed attempt's frames), so every later rung OOMed on the
    leftovers. The previous attempt's model must be garbage by the time the next rung loads."""
    import gc
    import weakref

    import torch

    from datasets import Dataset

    from tests.helpers import make_spec
    from trinity_core.events import Emitter
    from trinity_core.options import RunOptions

    loaded: list[weakref.ref] = []

    class Model:  # stands in for a loaded model: real ones are full of reference cycles
        def __init__(self):
            self.cycle = self

    class Backend:
        name = "peft"

        def load(self, spec, tokenizer=None):
            assert all(ref() is None for ref in loaded), "the failed attempt's model is still alive"
            model = Model()
            loaded.append(weakref.ref(model))
            return model, None

    def train(model, *args, **kwargs):
        if len(loaded) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        from trinity_core.train.trainer import TrainOutcome

        return TrainOutcome(stopped=False, global_step=1, resumed_from=None)

    monkeypatch.setattr("trinity_core.train.trainer.train", train)
    spec = make_spec(tiny_spec, **{"model.max_seq_length": 4096})
    gc.disable()  # only the ladder's own gc.collect may free the cycle
    try:
        rows = Dataset.from_dict({"input_ids": [[2, 5, 6]], "assistant_masks": [[0, 1, 1]]})
        rung, _, attempts, _ = ladder.walk(spec, Backend(), rows, tmp_path, Emitter(), RunOptions())
    finally:
        gc.enable()
    assert [a.outcome for a in attempts] == ["oom", "ok"] and rung.name == "seq_2048"


def test_multimodal_estimate_adds_the_vision_tower():
    """The published Gemma-3-12B-it config (multimodal): the estimate is the text-only one plus the
    SigLIP tower + projector in 16 bits, counted from vision_config (they stay unquantised)."""
    from trinity_core import model_config

    config = model_config.load("unsloth/gemma-3-12b-it-bnb-4bit")  # the shipped published config
    vision, text = config["vision_config"], config["text_config"]
    h, i, p = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    siglip = (3 * p * p * h + h + (vision["image_size"] // p) ** 2 * h  # patch + position embeddings
              + vision["num_hidden_layers"] * (4 * (h * h + h) + 2 * h * i + i + h + 4 * h) + 2 * h)
    projector = h * text["hidden_size"] + h
    assert memory.vision_params(config) == siglip + projector == 421_290_864  # = the meta model's count
    spec = _spec(dora="fast", t4=True, accum=4)
    multimodal = memory.estimate(config, spec, "unsloth")
    text_only = memory.estimate(text, spec, "unsloth")
    assert multimodal.parts["vision"] * memory.GIB == pytest.approx((siglip + projector) * 2)  # ~0.78 GiB
    assert multimodal.gib - text_only.gib == pytest.approx(multimodal.parts["vision"])
    assert {k: v for k, v in multimodal.parts.items() if k != "vision"} == text_only.parts
    assert "vision" not in text_only.parts and memory.vision_params(text) == 0
    fp32 = memory.estimate(config, JobSpec.model_validate({"model": {"compute_dtype": "float32"}}), "unsloth")
    assert fp32.parts["vision"] == pytest.approx(2 * multimodal.parts["vision"])
