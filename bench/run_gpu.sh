#!/usr/bin/env bash
# The GPU measurements of docs/BENCHMARKS.md, one stage per device call (each fits in 10 minutes).
# Run from the repo root on the GPU machine with the wheels of ../shared/gpu/wheels.sh in
# .whl/site; results go to $OUT (default bench/results/gpu-out).
#
#   bash bench/run_gpu.sh tests small_bf16 grown_bf16 grown_peft    # 2026-11-26 call 4 (H100)
#   bash bench/run_gpu.sh ladder profile48 grown_t4                 # call 5 (H100)
#   bash bench/run_gpu.sh profile grown_bf16 loss                   # call 3 (H200)
#   bash bench/run_gpu.sh ladder compiled                           # call 7 (H200)
# (stages below; `grown` = grown_bf16 grown_t4 grown_peft; the 12B-shaped random model is built
# once per call, in /tmp/m12b)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/.whl/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-bench/results/gpu-out}
M=${TRINITY_BENCH_ROOT:-/tmp/m12b}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python - <<'EOF' | tee -a "$OUT/card.txt"
import torch, transformers, peft, bitsandbytes, trl
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "bitsandbytes", bitsandbytes.__version__, "trl", trl.__version__)
EOF
built=0
build() { [ $built = 1 ] || python bench/gpu_bench.py build "$M" 2 4 2>&1 | tail -2; built=1; }
U() { UNSLOTH_COMPILE_DISABLE=1 "$@"; }
stages=()
for stage in "$@"; do  # grown: the 48-layer rows; bf16 and T4 in separate processes (a T4 load leaves
  # Unsloth's fp16 LoRA casts patched in for later bf16 loads of the same process)
  [ "$stage" = grown ] && stages+=(grown_bf16 grown_t4 grown_peft) || stages+=("$stage")
done
for stage in "${stages[@]}"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    tests)  # Triton kernel, bf16 equivalence, run_job with Unsloth on the tiny model
      python -m pytest -m gpu -q -p no:cacheprovider tests/gpu -x 2>&1 | tee "$OUT/pytest.txt" | tail -30 ;;
    small_unsloth)  # 12B shape at 2 and 4 layers, every variant (the T4 ones last, see above)
      build; U python bench/gpu_bench.py run unsloth "$M" "$OUT/unsloth.jsonl" --deadline "${DEADLINE:-200}" ;;
    small_bf16)  # the bf16 variants only, both backends, 2 and 4 layers
      build
      U python bench/gpu_bench.py run unsloth "$M" "$OUT/unsloth.jsonl" --deadline 150 \
        --only lora_acc4 dora_fast_acc4 dora_peft_acc4 lora dora_fast
      python bench/gpu_bench.py run peft "$M" "$OUT/peft.jsonl" --deadline 100 \
        --only lora_acc4 dora_fast_acc4 dora_peft_acc4 lora dora_fast ;;
    grown_t4)
      build
      U python bench/gpu_bench.py run unsloth "$M" "$OUT/unsloth48_t4.jsonl" --depths 4 --grow-to 48 \
        --only t4_lora_acc4 t4_dora_fast_acc4 t4_dora_peft_acc4 --deadline 300 ;;
    grown_peft)
      build
      python bench/gpu_bench.py run peft "$M" "$OUT/peft48.jsonl" --depths 4 --grow-to 48 \
        --only lora_acc4 dora_fast_acc4 --deadline 100 ;;
    small_peft)
      build; python bench/gpu_bench.py run peft "$M" "$OUT/peft.jsonl" --deadline "${DEADLINE:-120}" ;;
    grown_bf16)  # key variants at 48 layers (the 4 built layers repeated), with 4-layer rows of the same call
      build
      U python bench/gpu_bench.py run unsloth "$M" "$OUT/unsloth48.jsonl" --depths 4 --grow-to 48 \
        --only lora_acc4 dora_fast_acc4 ${PEFT_DORA:+dora_peft_acc4} --deadline 300 ;;
    profile)  # CUDA kernel totals, LoRA vs fast DoRA, plain peft, 4 layers
      build; python bench/gpu_bench.py profile "$M" "$OUT" --depth 4 2>&1 | grep -E "^\[profile\]" ;;
    profile48)  # the same at 48 layers (4 repeated)
      build; mkdir -p "$OUT/p48"
      python bench/gpu_bench.py profile "$M" "$OUT/p48" --depth 4 --grow-to 48 2>&1 | grep -E "^\[profile\]" ;;
    loss)  # final loss, fast vs PEFT DoRA, same seeds and data, Unsloth bf16 on the tiny model
      U python bench/dora_loss.py --backend unsloth --dtype bfloat16 --seeds 0 1 2 --steps 60 \
        --out "$OUT/dora_loss.jsonl" 2>&1 | grep -E '^\{|mean|paired' ;;
    ladder)  # OOM ladder on genuine OOMs under the T4 cap (tests/gpu/test_unsloth.py)
      build
      TRINITY_BENCH_MODEL=$M/L4 TRINITY_BENCH_OUT=$OUT python -m pytest -m gpu -q -s -p no:cacheprovider \
        -p no:logging --tb=short tests/gpu/test_unsloth.py -k ladder 2>&1 | tail -40 ;;
    rungs_t4)  # the seed ladder's lower rungs on the T4 path at 2 and 4 layers (out-of-sample rows for
      # the memory estimate, tests/core/test_memory.py)
      build
      U python bench/gpu_bench.py run unsloth "$M" "$OUT/unsloth_rungs_t4.jsonl" --depths 2 4 --deadline 500 \
        --only t4_dora_fast_s2048_acc4 t4_dora_fast_s2048_r32_acc4 t4_lora_s2048_r32_acc4 t4_lora_s2048_r32_qv_acc4 ;;
    rungs_t4_48)  # the same at 48 layers (the 4 built layers repeated)
      build
      U python bench/gpu_bench.py run unsloth "$M" "$OUT/unsloth_rungs_t4_48.jsonl" --depths 4 --grow-to 48 \
        --deadline 500 --only t4_dora_fast_s2048_acc4 t4_dora_fast_s2048_r32_acc4 t4_lora_s2048_r32_acc4 \
        t4_lora_s2048_r32_qv_acc4 ;;
    compiled)  # Unsloth's torch.compile mode (no UNSLOTH_COMPILE_DISABLE): the LoRA anchor, and fast DoRA
      build
      python bench/gpu_bench.py run unsloth "$M" "$OUT/compiled.jsonl" --depths 4 --tag compiled_ \
        --only lora_acc4 dora_fast_acc4 --deadline "${DEADLINE:-200}" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
ls "$OUT"/*.jsonl >/dev/null 2>&1 && python bench/gpu_bench.py table "$OUT"/*.jsonl > "$OUT/table.txt" 2>&1
echo "=== done $(date +%T)"
