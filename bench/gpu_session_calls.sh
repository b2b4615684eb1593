#!/usr/bin/env bash
# One device call: GPU tests of the open issues, the norm refresh at 48 layers, or the two-machine pair.
# Carry .whl/site (../shared/gpu/wheels.sh) and, for `tests`, .gpu-extra/site.tar.gz (bench/gpu_extra.sh;
# run_job's report needs its text metrics):
#   bash bench/gpu_session_calls.sh tests     # multimodal Unsloth test (background) + NF4 kernel tests
#   bash bench/gpu_session_calls.sh cudnnsliding  # cuDNN's banded kernel for sliding layers (carry .gpu-cudnn too,
#                                             # bench/gpu_cudnn_fe.sh): attention_kernels, its GPU test, then the
#                                             # 12B pattern at 48 layers without checkpointing: LoRA layers with it,
#                                             # compiled LoRA, the LoRA layers without it (as BUDGET allows;
#                                             # ROWS=0: no rows)
#   bash bench/gpu_session_calls.sh layout    # cuDNN's kernels on the projections' memory order (profiled), compiled
#                                             # LoRA, then on heads-contiguous inputs (ROW=dora_fast_acc4: fast DoRA)
#   bash bench/gpu_session_calls.sh bandprof  # call 61's cuDNN-band LoRA row, one optimizer step profiled: the GPU's
#                                             # idle time and kernel totals (SK=flex: flex on the sliding layers)
#   bash bench/gpu_session_calls.sh bandplans # cuDNN's band and causal graphs by plan, timed alone (carry .gpu-cudnn)
#   bash bench/gpu_session_calls.sh gemms     # bench/gemm_shapes.py: a 12B layer's GEMMs alone by cuBLAS (< 1 min)
#   bash bench/gpu_session_calls.sh mmbf16    # the multimodal checkpoint on the bf16 path (Trinity's compiled layers),
#                                             # fast DoRA and LoRA at once (~300 s; calls 57-59 had no rouge_score)
#   bash bench/gpu_session_calls.sh refresh   # bench/norm_refresh.py --layers 48 --reuse-layer --sweep --profile
#   bash bench/gpu_session_calls.sh kernel    # NF4 kernel tests, then the refresh (needs .whl/site only)
#   bash bench/gpu_session_calls.sh kernels   # tests/gpu/test_qdora_cuda.py (K=: a -k expression)
#   bash bench/gpu_session_calls.sh tiles     # bench/gated_act_sweep.py, the kernel's GPU test, speed rows with the
#                                             # fastest tiles (BUDGET=, TILES0=1: also the default tiles' row)
#   bash bench/gpu_session_calls.sh t4mem     # T4 path, lean vs Unsloth's attention, 4 and 48 layers (#20 goal 3)
#   bash bench/gpu_session_calls.sh t4tests   # lean attention vs Unsloth's (12B-shaped layers) + fast-DoRA CUDA tests
#   bash bench/gpu_session_calls.sh speed     # #20 goal 1: Unsloth's compiled LoRA; Trinity's compiled kernels
#                                             # (LoRA, fast DoRA); the same with eager kernels (GROW=48: also 48 layers;
#                                             # PROFILE=1: kernel totals of one optimizer step a row (TRACE=1: and
#                                             # where the GPU waits, bench/gpu_timeline.py; KEEP_TRACE=1: the
#                                             # traces come back too), SKIP_EAGER=1;
#                                             # LAYERS=1: decoder layers compiled too, Dynamo's graph-break and
#                                             # recompile logs in speed.log; GROWN_ONLY=1: 48 layers only;
#                                             # with LAYERS=1, OPAQUE=1: also the regions with bitsandbytes' op and
#                                             # the custom ops; LORA_LAYERS=1: also LoRA in Trinity's layers;
#                                             # GUARDS=1: also the layers with all of Dynamo's guards;
#                                             # TORCH_ACT=1: also the gated activation in torch operations;
#                                             # NOSYNC=1: also both rows without bitsandbytes' per-parameter sync)
#   bash bench/gpu_session_calls.sh down      # GatedActDownInGraph: GPU tests, 48 layers with it, LoRA, without it
#   bash bench/gpu_session_calls.sh downtiles # its backward kernel by tile (gated_act_sweep.py --lora 64), then 48
#                                             # layers with the fastest tiles (profiled, trace kept) and LoRA
#   bash bench/gpu_session_calls.sh gemm      # fast_dora/lora_in_gemm: its GPU test, then 48 layers with it (profiled,
#                                             # trace kept), Unsloth's compiled LoRA, fast DoRA without it
#   bash bench/gpu_session_calls.sh loragemm  # 48 layers: fast DoRA (defaults), Unsloth's compiled LoRA, Trinity's
#                                             # LoRA layers with lora_in_gemm on every projection (NOLORA=1: also
#                                             # without)
#   bash bench/gpu_session_calls.sh loraprof  # fast DoRA and compiled LoRA at 48 layers, then Trinity's LoRA layers at 4
#                                             # layers with and without lora_in_gemm, profiled (traces kept)
#   bash bench/gpu_session_calls.sh loraproj  # 48 layers: Trinity's LoRA layers with lora_in_gemm on gate, up and o_proj
#                                             # (PROJ=), Unsloth's compiled LoRA, the layers without lora_in_gemm
#   bash bench/gpu_session_calls.sh loraflex  # profiled 4-layer steps (traces kept): Trinity's LoRA layers, fast DoRA,
#                                             # compiled LoRA (the LoRA path's attention backward against DoRA's)
#   bash bench/gpu_session_calls.sh loracode  # inductor's code of Trinity's LoRA layers (defaults) and of fast DoRA's,
#                                             # 4 layers, one cache directory each (their flex attention kernels, call
#                                             # 39: backward 1872 vs 1560 us a launch); REFRESH=1: then bench/norm_refresh.py
#   bash bench/gpu_session_calls.sh lorablocks # 48 layers: Trinity's LoRA layers (whole-block compiles), Unsloth's
#                                             # compiled LoRA, the LoRA layers without them, fast DoRA (as budget
#                                             # allows); the first row's flex IS_DIVISIBLE counted
#   bash bench/gpu_session_calls.sh masks     # 48 layers: LoRA layers (block masks cached), compiled LoRA, (QKV=1: q/k/v
#                                             # in the GEMMs too), the LoRA layers without the cache
#   bash bench/gpu_session_calls.sh dense     # dense attention's GPU test; 48 layers: LoRA layers, compiled LoRA, the
#                                             # LoRA layers with flex attention (NOFLEX=1: not), fast DoRA (DORA=1)
#   bash bench/gpu_session_calls.sh pattern   # 48 layers with the 12B's pattern (every 6th global): LoRA layers,
#                                             # compiled LoRA, the LoRA layers with flex attention
#   bash bench/gpu_session_calls.sh nockpt    # the same without gradient checkpointing: compiled LoRA, LoRA layers
#                                             # (the peer's fastest path where memory allows), then LoRA layers with it
#   bash bench/gpu_session_calls.sh doranockpt # the same for the recipe's fast DoRA (cuDNN's band where carried) against
#                                             # compiled LoRA, then fast DoRA with flex on the sliding layers
#   bash bench/gpu_session_calls.sh lengths   # 4 layers: a new sequence length, a new compile? LoRA with/without masks
#   bash bench/gpu_session_calls.sh code      # inductor's code and a kept trace: fast DoRA's layers (NODOWN=1:
#                                             # without GatedActDownInGraph; LORA=1: Trinity's LoRA layers with
#                                             # lora_in_gemm on every projection instead), compiled LoRA, at 4 layers
#   bash bench/gpu_session_calls.sh tinyjob   # run_job's tiny job with compiled decoder layers, CPU tensors probed
#   bash bench/gpu_session_calls.sh lorajob   # flex attention's block configs (bench/flex_configs.py), then run_job's
#                                             # tiny job with LoRA, the backend choosing Unsloth's compile (LIMIT=)
#   bash bench/gpu_session_calls.sh pair      # the refresh, then LoRA vs fast DoRA at 4 and 48 layers
#                                             # (bench/run_gpu.sh grown_bf16): one machine of two
set -uo pipefail
cd "$(dirname "$0")/.."
[ -d .gpu-extra/site ] || [ ! -f .gpu-extra/site.tar.gz ] || tar xzf .gpu-extra/site.tar.gz -C .gpu-extra
for w in .gpu-cudnn/*.whl; do  # bench/gpu_cudnn_fe.sh's wheel, where carried
  [ -f "$w" ] && [ ! -d .gpu-cudnn/site ] && python -m zipfile -e "$w" .gpu-cudnn/site
done
export PYTHONPATH=$PWD/.whl/site:$PWD/.gpu-extra/site:$PWD/.gpu-cudnn/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
  TOKENIZERS_PARALLELISM=false UNSLOTH_COMPILE_DISABLE=1
OUT=${OUT:-bench/results/gpu-out}
mkdir -p "$OUT"
# no git HEAD here: the device's copy of the tree carries a stale .git (seen: cb5ee82 for a tree at 73f2df5)
# which machine: every host so far was named `vm`; the GPU's UUID, serial and bus, the boot id and CPU tell them apart
{ nvidia-smi --query-gpu=name,memory.total,driver_version,uuid,serial,pci.bus_id --format=csv,noheader; hostname
  cat /etc/machine-id /proc/sys/kernel/random/boot_id; grep -m1 "model name" /proc/cpuinfo; nproc; } > "$OUT/machine.txt" 2>&1
cp "$OUT/machine.txt" "$OUT/card.txt"  # bench/run_gpu.sh rewrites card.txt
# the 48-layer modes (down, downtiles, gemm, loragemm): the model built, rows run until BUDGET seconds have passed
# (row48 ARGS...), then the profiles archived and the table made (wrap48)
start48() { end=$(( $(date +%s) + ${BUDGET:-$1} ))
  python bench/gpu_bench.py build /tmp/m12b 4 > "$OUT/speed.log" 2>&1 || tail -5 "$OUT/speed.log"; }
row48() { python bench/gpu_bench.py run unsloth /tmp/m12b "$OUT/speed.jsonl" --depths 4 --grow-to 48 --only-grown \
            --deadline $(( end - $(date +%s) )) "$@" >> "$OUT/speed.log" 2>&1; }
profiled48() { TRINITY_BENCH_PROFILE=$OUT TRINITY_BENCH_TRACE=1 TRINITY_BENCH_KEEP_TRACE=1 row48 "$@"; }
wrap48() { rm -f "$OUT/card.txt"
  ! ls "$OUT"/prof-*.txt >/dev/null 2>&1 || { tar czf "$OUT/prof.tar.gz" -C "$OUT" $(cd "$OUT" && ls prof-*.txt) \
    && rm "$OUT"/prof-*.txt; }
  python bench/gpu_bench.py table "$OUT/speed.jsonl" > "$OUT/speed-table.txt" 2>&1
  cut -c1-800 "$OUT/speed.jsonl"; grep -i "error\|Traceback\|compiling failed\|graph break" "$OUT/speed.log" | tail -8; }
case ${1:-} in
  tiles)  # the gated activation's backward kernel by tile (bench/gated_act_sweep.py), its GPU test, then the
          # speed rows with the fastest tiles (TILES), compiled LoRA and (TILES0=1) the default tiles
    python bench/gated_act_sweep.py --out "$OUT/gated_act_sweep.jsonl" > "$OUT/gated_act_sweep.log" 2>&1
    best=$(python -c "import json,sys; print([json.loads(l) for l in open(sys.argv[1])][-1].get('best_tiles', ''))" \
           "$OUT/gated_act_sweep.jsonl")
    grep -v '"tiles"' "$OUT/gated_act_sweep.jsonl" | cut -c1-300; echo "best tiles: $best"
    K="gated" "$0" kernels  # the eager kernel (also writing over e and u) and inside a compiled graph
    TILES=$best LAYERS=1 SKIP_EAGER=1 GROW=48 GROWN_ONLY=1 "$0" speed ;;
  kernels)  # GPU tests of the fast-DoRA kernels (K: a -k expression)
    python -m pytest -m gpu -q -rf --tb=short -p no:cacheprovider tests/gpu/test_qdora_cuda.py ${K:+-k "$K"} \
      > "$OUT/pytest-qdora.txt" 2>&1
    tail -4 "$OUT/pytest-qdora.txt" ;;
  tests)
    python -m pytest -m gpu -q -rf --tb=short -p no:cacheprovider tests/gpu/test_unsloth_multimodal.py \
      > "$OUT/pytest-multimodal.txt" 2>&1 &
    mm=$!
    python -m pytest -m gpu -q -rf --tb=short -p no:cacheprovider tests/gpu/test_nf4_matmul_cuda.py \
      > "$OUT/pytest-nf4.txt" 2>&1
    tail -4 "$OUT/pytest-nf4.txt"
    wait $mm; tail -6 "$OUT/pytest-multimodal.txt" ;;
  cudnnsliding)
    end=$(( $(date +%s) + ${BUDGET:-480} ))
    python bench/attention_kernels.py > "$OUT/attention_kernels.txt" 2>&1; cat "$OUT/attention_kernels.txt"
    python -m pytest -m gpu -x -q -rA --tb=short -p no:cacheprovider tests/gpu/test_dense_attention_cuda.py \
      > "$OUT/pytest-dense.txt" 2>&1; tail -4 "$OUT/pytest-dense.txt"
    grep -q "torch.ops.cudnn.sdpa_fwd" "$OUT/attention_kernels.txt" || { echo "no cudnn-frontend: no rows"; exit 3; }
    [ "${ROWS:-1}" = 1 ] || exit 0  # ROWS=0: the kernel timings and the GPU test only
    python bench/gpu_bench.py build /tmp/m12r 6 --global-every 6 > "$OUT/speed.log" 2>&1 || tail -5 "$OUT/speed.log"
    row6() { python bench/gpu_bench.py run unsloth /tmp/m12r "$OUT/speed.jsonl" --depths 6 --grow-to 48 --only-grown \
               --deadline $(( end - $(date +%s) )) "$@" >> "$OUT/speed.log" 2>&1; }
    row6 --only lora_acc4 --compile-layers --checkpointing off --sliding-kernel cudnn --tag nockpt_cudnn_layers_
    UNSLOTH_COMPILE_DISABLE=0 row6 --only lora_acc4 --checkpointing off --tag nockpt_compiled_
    row6 --only lora_acc4 --compile-layers --checkpointing off --sliding-kernel flex --tag nockpt_layers_
    wrap48 ;;
  layout)  # cuDNN's kernels fed in the projections' memory order (the default) against compiled LoRA and against
            # (batch, heads, seq, dim)-contiguous inputs: call 61's rows, the first profiled (carry .gpu-cudnn)
    end=$(( $(date +%s) + ${BUDGET:-480} ))
    python bench/gpu_bench.py build /tmp/m12r 6 --global-every 6 > "$OUT/speed.log" 2>&1 || tail -5 "$OUT/speed.log"
    row6() { python bench/gpu_bench.py run unsloth /tmp/m12r "$OUT/speed.jsonl" --depths 6 --grow-to 48 --only-grown \
               --deadline $(( end - $(date +%s) )) "$@" >> "$OUT/speed.log" 2>&1; }
    TRINITY_BENCH_PROFILE=$OUT TRINITY_BENCH_TRACE=1 TRINITY_BENCH_KEEP_TRACE=1 row6 --only ${ROW:-lora_acc4} \
      --compile-layers --checkpointing off --tag nockpt_cudnn_proj_layers_
    cat "$OUT"/prof-timeline-*.txt | head -3
    UNSLOTH_COMPILE_DISABLE=0 row6 --only lora_acc4 --checkpointing off --tag nockpt_compiled_
    row6 --only ${ROW:-lora_acc4} --compile-layers --checkpointing off --attention-layout heads \
      --tag nockpt_cudnn_heads_layers_
    wrap48 ;;
  bandprof)  # call 61's first row (LoRA layers, cuDNN's band, no checkpointing, 48 layers) with one more optimizer
              # step profiled: kernel totals and the GPU's idle time (bench/gpu_timeline.py; CUDA activity only, so
              # the host is not slowed by its own tracing); carry .gpu-cudnn
    end=$(( $(date +%s) + ${BUDGET:-300} ))
    python bench/gpu_bench.py build /tmp/m12r 6 --global-every 6 > "$OUT/speed.log" 2>&1 || tail -5 "$OUT/speed.log"
    TRINITY_BENCH_PROFILE=$OUT TRINITY_BENCH_TRACE=1 TRINITY_BENCH_KEEP_TRACE=1 python bench/gpu_bench.py run unsloth \
      /tmp/m12r "$OUT/speed.jsonl" --depths 6 --grow-to 48 --only-grown --deadline $(( end - $(date +%s) )) \
      --only lora_acc4 --compile-layers --checkpointing off --sliding-kernel "${SK:-cudnn}" \
      --tag "nockpt_${SK:-cudnn}_layers_" >> "$OUT/speed.log" 2>&1
    cat "$OUT"/prof-timeline-*.txt | head -40; wrap48 ;;
  bandplans)  # cuDNN's banded (sliding) and causal (global) graphs by execution plan, each timed alone, beside
              # cudnn-frontend's op per call (bench/cudnn_band_plans.py; carry .gpu-cudnn; < 2 min)
    python bench/cudnn_band_plans.py > "$OUT/band_plans.txt" 2>&1
    python bench/cudnn_band_plans.py --window 0 > "$OUT/causal_plans.txt" 2>&1
    cat "$OUT/band_plans.txt" "$OUT/causal_plans.txt" ;;
  gemms)
    python bench/gemm_shapes.py > "$OUT/gemm_shapes.txt" 2>&1; cat "$OUT/gemm_shapes.txt" ;;
  mmbf16)  # each a fresh job process as the worker's; -x --tb=long: why it failed is printed before any timeout
    T=tests/gpu/test_unsloth_multimodal.py::test_the_bf16_path_compiles_the_text_layers_only
    for p in lora fast-dora; do
      ( timeout "${LIMIT:-480}" python -m pytest -m gpu -x -q -rA --tb=long -p no:cacheprovider --durations=0 "$T[$p]" \
          > "$OUT/pytest-mm-bf16-$p.txt" 2>&1; echo "rc=$?" >> "$OUT/pytest-mm-bf16-$p.txt" ) &
    done
    wait
    for p in lora fast-dora; do echo "== $p"; tail -4 "$OUT/pytest-mm-bf16-$p.txt"; done ;;
  kernel)
    python -m pytest -m gpu -q -rf --tb=short -p no:cacheprovider tests/gpu/test_nf4_matmul_cuda.py \
      > "$OUT/pytest-nf4.txt" 2>&1
    tail -4 "$OUT/pytest-nf4.txt"
    "$0" refresh ;;
  pair)
    python bench/norm_refresh.py --layers 48 --reuse-layer --iters 20 --out "$OUT/norm_refresh.jsonl" \
      > "$OUT/norm_refresh.log" 2>&1
    grep '"refresh"' "$OUT/norm_refresh.jsonl" | cut -c1-160
    bash bench/run_gpu.sh grown_bf16 > "$OUT/grown_bf16.log" 2>&1
    tail -3 "$OUT/grown_bf16.log"; cut -c1-200 "$OUT/unsloth48.jsonl" ;;
  refresh)
    python bench/norm_refresh.py --layers 48 --reuse-layer --sweep --profile --out "$OUT/norm_refresh.jsonl" \
      > "$OUT/norm_refresh.log" 2>&1
    grep -v '"sweep' "$OUT/norm_refresh.jsonl" | tail -20 ;;
  t4mem)  # the T4 path at 4 and 48 layers, one process each: the lean attention under the allocator trace
          # (TRINITY_BENCH_MEMSNAP: the same peak, ~0.2% slower, seen in call 2), Unsloth's attention, then the
          # seq 8192 rung with the lean attention
    python bench/gpu_bench.py build /tmp/m12b 4 > "$OUT/t4mem.log" 2>&1 || tail -5 "$OUT/t4mem.log"
    run() { python bench/gpu_bench.py run unsloth /tmp/m12b "$OUT/t4mem.jsonl" --depths 4 --grow-to 48 \
              --deadline 500 "$@" >> "$OUT/t4mem.log" 2>&1; }
    TRINITY_BENCH_MEMSNAP=$OUT run --only t4_dora_fast_acc4
    run --only t4_dora_fast_acc4 --stock-attention --tag stock_attention_
    run --only t4_dora_fast_s8192_acc4
    rm -f "$OUT/card.txt"  # at most 8 files come back
    cut -c1-900 "$OUT/t4mem.jsonl"; grep -v '^{' "$OUT/t4mem.log" | grep -i "error\|Traceback" | tail -5 ;;
  t4tests)  # the lean attention against Unsloth's on 12B-shaped layers, and the fast-DoRA CUDA tests
    python bench/gpu_bench.py build /tmp/m12b 4 > "$OUT/build.log" 2>&1 || tail -5 "$OUT/build.log"
    TRINITY_BENCH_MODEL=/tmp/m12b/L4 python -m pytest -m gpu -q -rf -s --tb=short -p no:cacheprovider \
      tests/gpu/test_lean_attention_cuda.py > "$OUT/pytest-lean-attention.txt" 2>&1
    python -m pytest -m gpu -q -rf --tb=short -p no:cacheprovider tests/gpu/test_qdora_cuda.py \
      > "$OUT/pytest-qdora.txt" 2>&1
    rm -f "$OUT/card.txt"
    tail -5 "$OUT/pytest-lean-attention.txt" | cut -c1-1500; tail -3 "$OUT/pytest-qdora.txt" ;;
  speed)  # one process per mode (Unsloth reads UNSLOTH_COMPILE_DISABLE at import); ONLY= narrows the variants
    [ -z "${PROFILE:-}" ] || export TRINITY_BENCH_PROFILE=$OUT
    [ -z "${TRACE:-}" ] || export TRINITY_BENCH_TRACE=1 TRINITY_BENCH_PROFILE_CPU=1  # with PROFILE=1
    [ -z "${KEEP_TRACE:-}" ] || export TRINITY_BENCH_KEEP_TRACE=1  # with TRACE=1: the traces too, compacted
    end=$(( $(date +%s) + ${BUDGET:-540} ))  # rows not started by then are skipped
    python bench/gpu_bench.py build /tmp/m12b 4 > "$OUT/speed.log" 2>&1 || tail -5 "$OUT/speed.log"
    run() { python bench/gpu_bench.py run unsloth /tmp/m12b "$OUT/speed.jsonl" --depths 4 \
              ${GROW:+--grow-to $GROW} ${GROWN_ONLY:+--only-grown} --deadline $(( end - $(date +%s) )) "$@" \
              >> "$OUT/speed.log" 2>&1; }
    if [ -n "${LAYERS:-}" ]; then  # Trinity's compiled layers first, then the reference
      TORCH_LOGS=${TORCH_LOGS-graph_breaks,recompiles} run --only ${ONLY:-dora_fast_acc4} --compile-layers \
        ${TILES:+--gated-tiles $TILES} --tag layers_
      UNSLOTH_COMPILE_DISABLE=0 run --only lora_acc4 --tag compiled_
      [ -z "${TILES0:-}" ] || run --only ${ONLY:-dora_fast_acc4} --compile-layers --tag tiles0_  # default tiles
      [ -z "${BASELINE:-}" ] || run --only ${ONLY:-dora_fast_acc4} --tag kernels_  # fast DoRA, layers uncompiled
      [ -z "${OPAQUE:-}" ] || run --only ${ONLY:-dora_fast_acc4} --compile-layers --region-opaque --tag opaque_
      if [ -n "${NOSYNC:-}" ]; then  # 8-bit AdamW without bitsandbytes' per-parameter sync, both paths
        run --only ${ONLY:-dora_fast_acc4} --compile-layers --no-bnb-sync --tag nosync_layers_
        UNSLOTH_COMPILE_DISABLE=0 run --only lora_acc4 --no-bnb-sync --tag nosync_compiled_
      fi
      [ -z "${TORCH_ACT:-}" ] || run --only ${ONLY:-dora_fast_acc4} --compile-layers --region-torch-act --tag torchact_
      [ -z "${GUARDS:-}" ] || run --only ${ONLY:-dora_fast_acc4} --compile-layers --module-guards --tag guarded_
      [ -z "${LORA_LAYERS:-}" ] || run --only lora_acc4 --compile-layers --tag layers_  # Trinity's LoRA path
    else
      UNSLOTH_COMPILE_DISABLE=0 run --only lora_acc4 --tag compiled_
      run --only ${ONLY:-lora_acc4 dora_fast_acc4} --tag kernels_
    fi
    [ -n "${SKIP_EAGER:-}" ] || run --only ${ONLY:-lora_acc4 dora_fast_acc4} --eager-kernels --tag eager_
    rm -f "$OUT/card.txt"  # at most 8 files come back: the profiles travel as one archive
    ! ls "$OUT"/prof-*.txt >/dev/null 2>&1 || { tar czf "$OUT/prof.tar.gz" -C "$OUT" $(cd "$OUT" && ls prof-*.txt) \
      && rm "$OUT"/prof-*.txt; }
    python bench/gpu_bench.py table "$OUT/speed.jsonl" > "$OUT/speed-table.txt" 2>&1
    cut -c1-700 "$OUT/speed.jsonl"; grep -i "error\|Traceback\|recompil" "$OUT/speed.log" | tail -8 ;;
  down)  # mlp.GatedActDownInGraph: its GPU tests, then at 48 layers fast DoRA with it (one profiled step, the trace
          # kept), Unsloth's compiled LoRA, and (if BUDGET leaves time) fast DoRA without it
    K=${K:-down_in_graph and gelu_tanh} "$0" kernels
    start48 420
    profiled48 --only dora_fast_acc4 --compile-layers --tag down_layers_
    UNSLOTH_COMPILE_DISABLE=0 row48 --only lora_acc4 --tag compiled_
    row48 --only dora_fast_acc4 --compile-layers --no-down-in-graph --tag layers_
    wrap48 ;;
  downtiles)  # GatedActDownInGraph's backward kernel by tile at the 12B shape, then fast DoRA at 48 layers with the
              # fastest (one profiled step, its trace kept) and Unsloth's compiled LoRA, same run
    python bench/gated_act_sweep.py --lora 64 --out "$OUT/down_sweep.jsonl" > "$OUT/down_sweep.log" 2>&1
    best=$(python -c "import json,sys; print([json.loads(l) for l in open(sys.argv[1])][-1].get('best_tiles', ''))" \
           "$OUT/down_sweep.jsonl")
    grep -v '"tiles"' "$OUT/down_sweep.jsonl" | cut -c1-300; echo "best tiles: $best"
    start48 330
    profiled48 --only dora_fast_acc4 --compile-layers ${best:+--down-tiles $best} --tag down_layers_
    UNSLOTH_COMPILE_DISABLE=0 row48 --only lora_acc4 --tag compiled_
    wrap48 ;;
  gemm)  # the adapters' products inside the base GEMMs (fast_dora/lora_in_gemm), on by default, against compiled
         # LoRA and against fast DoRA without them, 48 layers, same run
    python -m pytest -m gpu -q -rf --tb=short -p no:cacheprovider tests/gpu/test_nf4_matmul_cuda.py -k tail \
      > "$OUT/pytest-tail.txt" 2>&1
    tail -3 "$OUT/pytest-tail.txt"
    start48 420
    profiled48 --only dora_fast_acc4 --compile-layers --tag gemm_layers_
    UNSLOTH_COMPILE_DISABLE=0 row48 --only lora_acc4 --tag compiled_
    row48 --only dora_fast_acc4 --compile-layers --no-lora-in-gemm --tag layers_
    wrap48 ;;
  loragemm)  # Trinity's LoRA path with the adapters' products inside every projection's base GEMM (call 36; since
             # call 38 LoRA's default is gate, up and o_proj only), fast DoRA's defaults, Unsloth's compiled LoRA
    start48 450
    row48 --only lora_acc4 --compile-layers --lora-in-gemm-projections all --tag gemm_layers_
    UNSLOTH_COMPILE_DISABLE=0 row48 --only lora_acc4 --tag compiled_
    row48 --only dora_fast_acc4 --compile-layers --tag layers_
    [ -z "${NOLORA:-}" ] || row48 --only lora_acc4 --compile-layers --no-lora-in-gemm --tag layers_
    wrap48 ;;
  loraprof)  # call 36's LoRA-with-lora_in_gemm row ran at 0.69x of the same layers without it: fast DoRA (defaults)
             # and compiled LoRA at 48 layers on this host, then one profiled step (trace kept) of Trinity's LoRA
             # layers at 4 layers with lora_in_gemm and without
    start48 ${BUDGET:-400}
    row48 --only dora_fast_acc4 --compile-layers --tag layers_
    UNSLOTH_COMPILE_DISABLE=0 row48 --only lora_acc4 --tag compiled_
    for a in "--lora-in-gemm-projections all:gemm_layers_" "--no-lora-in-gemm:layers_"; do  # call 37: with, without
      TRINITY_BENCH_PROFILE=$OUT TRINITY_BENCH_TRACE=1 TRINITY_BENCH_KEEP_TRACE=1 python bench/gpu_bench.py run unsloth \
        /tmp/m12b "$OUT/speed.jsonl" --depths 4 --only lora_acc4 --compile-layers ${a%%:*} --tag "${a##*:}" \
        >> "$OUT/speed.log" 2>&1
    done
    wrap48 ;;
  loraproj)  # Trinity's LoRA layers with the adapters' products inside the base GEMMs of gate, up and o_proj only
             # (PROJ; call 37: with q, k and v's too their attention kernels ran 2-4x slower), Unsloth's compiled
             # LoRA, the same layers without lora_in_gemm; 48 layers
    start48 ${BUDGET:-520}
    row48 --only lora_acc4 --compile-layers --lora-in-gemm --lora-in-gemm-projections ${PROJ:-gate_proj,up_proj,o_proj} \
      --tag gemm_proj_layers_
    UNSLOTH_COMPILE_DISABLE=0 row48 --only lora_acc4 --tag compiled_
    row48 --only lora_acc4 --compile-layers --no-lora-in-gemm --tag layers_
    wrap48 ;;
  loraflex)  # one profiled step (traces kept) at 4 layers of Trinity's LoRA layers (defaults: gate, up and o_proj in
             # the GEMMs), fast DoRA (defaults) and Unsloth's compiled LoRA: where the LoRA path's flex-attention
             # backward (1885 us a launch in call 37, before o_proj joined) stands against fast DoRA's (~1500 us)
    export TRINITY_BENCH_PROFILE=$OUT TRINITY_BENCH_TRACE=1 TRINITY_BENCH_KEEP_TRACE=1
    python bench/gpu_bench.py build /tmp/m12b 4 > "$OUT/speed.log" 2>&1 || tail -5 "$OUT/speed.log"
    for a in "lora_acc4 --compile-layers" "dora_fast_acc4 --compile-layers"; do
      python bench/gpu_bench.py run unsloth /tmp/m12b "$OUT/speed.jsonl" --depths 4 --only $a --tag layers_ \
        >> "$OUT/speed.log" 2>&1
    done
    UNSLOTH_COMPILE_DISABLE=0 python bench/gpu_bench.py run unsloth /tmp/m12b "$OUT/speed.jsonl" --depths 4 \
      --only lora_acc4 --tag compiled_ >> "$OUT/speed.log" 2>&1
    wrap48 ;;
  lorablocks)  # call 41: Trinity's LoRA graph kept the length symbolic (inductor's flex attention with bounds checks,
                # IS_DIVISIBLE=False), fast DoRA's had specialised on 4096. Call 42 ran these rows with 203cdd8 (a
                # second compile for lengths in whole 128-token blocks, stated by torch._check): no gain, and call 43
                # found IS_DIVISIBLE still False on the GPU; reverted. The rows stand for the next attempt
    # Call 44 (at 3fb89eb) ran it with kernel_options={"IS_DIVISIBLE": True} added (then --whole-blocks): 16 of 16
    # templates True, +1.4%; now the default (compiled_layers.WHOLE_BLOCKS; --no-whole-blocks for the row without).
    # The first row's flex templates' IS_DIVISIBLE are counted from inductor's cache (emptied before it)
    start48 ${BUDGET:-450}
    rm -rf /tmp/torchinductor_*
    row48 --only lora_acc4 --compile-layers --tag blocks_layers_
    grep -rho "'IS_DIVISIBLE': [A-Za-z]*" /tmp/torchinductor_* --include="*.py" | sort | uniq -c | tee "$OUT/divisible.txt"
    UNSLOTH_COMPILE_DISABLE=0 row48 --only lora_acc4 --tag compiled_
    row48 --only lora_acc4 --compile-layers --no-whole-blocks --tag layers_
    row48 --only dora_fast_acc4 --compile-layers --tag blocks_layers_
    wrap48 ;;
  masks)  # call 45: flex attention's block masks built once a shape (trinity_core/train/block_masks.py: ~9 ms of host
          # work at each micro-batch's start, call 43's trace), with the whole-block compiles (call 44): Trinity's
          # LoRA layers, Unsloth's compiled LoRA, q/k/v's adapters in the GEMMs too (0.69x in call 42, before whole
          # blocks), the LoRA layers without the cache. Call 45 ran past the call's 600 s in its fourth row; since,
          # q/k/v's row only with QKV=1 (0.786x in call 45)
    start48 ${BUDGET:-440}
    row48 --only lora_acc4 --compile-layers --tag layers_
    UNSLOTH_COMPILE_DISABLE=0 row48 --only lora_acc4 --tag compiled_
    [ -z "${QKV:-}" ] || row48 --only lora_acc4 --compile-layers --lora-in-gemm-projections all --tag qkv_layers_
    row48 --only lora_acc4 --compile-layers --no-block-masks --tag nomasks_layers_
    wrap48 ;;
  dense)  # plain masks' attention through torch's dense kernels (trinity_core/train/dense_attention.py; call 47,
          # bench/attention_kernels.py: flex 1.965/3.720 ms a sliding/global layer's forward +
          # backward, FlashAttention-2 1.259, cuDNN 1.449 ms): its GPU test, then 48 layers: Trinity's LoRA layers,
          # Unsloth's compiled LoRA, the LoRA layers with flex attention (NOFLEX=1: not), fast DoRA's (DORA=1)
    python -m pytest -m gpu -q -rf --tb=short -p no:cacheprovider tests/gpu/test_dense_attention_cuda.py \
      > "$OUT/pytest-dense.txt" 2>&1; tail -4 "$OUT/pytest-dense.txt"
    start48 ${BUDGET:-470}
    row48 --only lora_acc4 --compile-layers --tag dense_layers_
    UNSLOTH_COMPILE_DISABLE=0 row48 --only lora_acc4 --tag compiled_
    [ -n "${NOFLEX:-}" ] || row48 --only lora_acc4 --compile-layers --no-dense-attention --tag flex_layers_
    [ -z "${DORA:-}" ] || row48 --only dora_fast_acc4 --compile-layers --tag dense_layers_
    wrap48 ;;
  pattern)  # the 12B's layer pattern at 48 layers (every 6th global; the other modes' 48 are grown from 4 sliding
            # layers, docs/BENCHMARKS.md "calls 47-50"): Trinity's LoRA layers (cuDNN on the global layers), Unsloth's
            # compiled LoRA, the LoRA layers with flex attention everywhere (as budget allows)
    end=$(( $(date +%s) + ${BUDGET:-450} ))
    python bench/gpu_bench.py build /tmp/m12r 6 --global-every 6 > "$OUT/speed.log" 2>&1 || tail -5 "$OUT/speed.log"
    python -c "import json; print(json.load(open('/tmp/m12r/L6/config.json'))['layer_types'])"
    row6() { python bench/gpu_bench.py run unsloth /tmp/m12r "$OUT/speed.jsonl" --depths 6 --grow-to 48 --only-grown \
               --deadline $(( end - $(date +%s) )) "$@" >> "$OUT/speed.log" 2>&1; }
    row6 --only lora_acc4 --compile-layers --tag pattern_layers_
    UNSLOTH_COMPILE_DISABLE=0 row6 --only lora_acc4 --tag pattern_compiled_
    row6 --only lora_acc4 --compile-layers --no-dense-attention --tag pattern_flex_layers_
    wrap48 ;;
  nockpt)  # the peer's fastest path on a card with the memory for it: the 12B's pattern at 48 layers (as `pattern`)
           # without gradient checkpointing, Unsloth's compiled LoRA and Trinity's LoRA layers, then (as budget allows)
           # the LoRA layers with Unsloth's offloaded checkpointing, the rows of call 54
    end=$(( $(date +%s) + ${BUDGET:-450} ))
    python bench/gpu_bench.py build /tmp/m12r 6 --global-every 6 > "$OUT/speed.log" 2>&1 || tail -5 "$OUT/speed.log"
    row6() { python bench/gpu_bench.py run unsloth /tmp/m12r "$OUT/speed.jsonl" --depths 6 --grow-to 48 --only-grown \
               --deadline $(( end - $(date +%s) )) "$@" >> "$OUT/speed.log" 2>&1; }
    UNSLOTH_COMPILE_DISABLE=0 row6 --only lora_acc4 --checkpointing off --tag nockpt_compiled_
    row6 --only lora_acc4 --compile-layers --checkpointing off --tag nockpt_layers_
    row6 --only lora_acc4 --compile-layers --tag pattern_layers_
    wrap48 ;;
  doranockpt)  # goal 1's DoRA half against the best peer path: the 12B's pattern at 48 layers without checkpointing,
               # the recipe's fast DoRA in Trinity's layers (the defaults: cuDNN's band on the sliding layers where
               # cudnn-frontend loads; carry .gpu-cudnn), Unsloth's compiled LoRA, then (as budget allows) fast DoRA
               # with flex attention on the sliding layers
    end=$(( $(date +%s) + ${BUDGET:-470} ))
    python bench/gpu_bench.py build /tmp/m12r 6 --global-every 6 > "$OUT/speed.log" 2>&1 || tail -5 "$OUT/speed.log"
    row6() { python bench/gpu_bench.py run unsloth /tmp/m12r "$OUT/speed.jsonl" --depths 6 --grow-to 48 --only-grown \
               --deadline $(( end - $(date +%s) )) "$@" >> "$OUT/speed.log" 2>&1; }
    row6 --only dora_fast_acc4 --compile-layers --checkpointing off --tag nockpt_layers_
    UNSLOTH_COMPILE_DISABLE=0 row6 --only lora_acc4 --checkpointing off --tag nockpt_compiled_
    row6 --only dora_fast_acc4 --compile-layers --checkpointing off --sliding-kernel flex --tag nockpt_flex_layers_
    wrap48 ;;
  lengths)  # whether a new sequence length compiles the layers again (call 41: fast DoRA's graph had specialised on
            # 4096): fast DoRA's row at 4 layers, then 2048, 3000 and 1000 tokens (--lengths), Dynamo's graphs after
            # each; TORCH_LOGS=recompiles names the guard a new length failed. Then the LoRA layers at 4 layers with
            # and without the block-mask cache (a fixed cost a micro-batch: the same milliseconds at 48 layers)
    python bench/gpu_bench.py build /tmp/m12b 4 > "$OUT/speed.log" 2>&1 || tail -5 "$OUT/speed.log"
    TORCH_LOGS=recompiles python bench/gpu_bench.py run unsloth /tmp/m12b "$OUT/lengths.jsonl" --depths 4 \
      --only dora_fast_acc4 --compile-layers --lengths 2048,3000,1000 --tag len_layers_ >> "$OUT/lengths.log" 2>&1
    python -c "import json,sys; [print(r['name'], r['status'], r.get('tok_s'), r.get('dynamo_graphs'), r.get('lengths'))
               for r in map(json.loads, open(sys.argv[1]))]" "$OUT/lengths.jsonl"
    grep -i "recompil" "$OUT/lengths.log" | sort | uniq -c | sort -rn | head -12
    for flag in "" --no-block-masks; do
      python bench/gpu_bench.py run unsloth /tmp/m12b "$OUT/speed.jsonl" --depths 4 --only lora_acc4 --compile-layers \
        $flag --tag "${flag:+nomasks_}layers_" >> "$OUT/speed.log" 2>&1
    done
    rm -f "$OUT/card.txt"; cut -c1-300 "$OUT/speed.jsonl" ;;
  loracode)  # call 39 (loraflex): the flex attention backward of Trinity's LoRA layers ran 1872 us a launch, fast
              # DoRA's 1560 and compiled LoRA's 1582 (4 layers, H200): the generated modules of both of Trinity's
              # paths (strides of q, k, v and of the gradients in the flex templates' calls), then the norm refresh
    python bench/gpu_bench.py build /tmp/m12b 4 > "$OUT/speed.log" 2>&1 || tail -5 "$OUT/speed.log"
    # (unsloth_zoo pops TORCHINDUCTOR_CACHE_DIR at import: call 40's per-run directories stayed empty; each run
    # gets the default directory, emptied before it; REFRESH=1: also the refresh)
    for a in "lora_acc4:lora" "dora_fast_acc4:dora"; do
      rm -rf /tmp/torchinductor_*
      python bench/gpu_bench.py run unsloth /tmp/m12b "$OUT/speed.jsonl" \
        --depths 4 --only ${a%%:*} --compile-layers --tag layers_ >> "$OUT/speed.log" 2>&1
      (cd /tmp && grep -rl "flex_attention" torchinductor_* --include="*.py" | tar czf "$OUT/code-${a##*:}.tar.gz" -T -)
    done
    [ -z "${REFRESH:-}" ] || python bench/norm_refresh.py --layers 48 --reuse-layer --sweep \
      --out "$OUT/norm_refresh.jsonl" > "$OUT/norm_refresh.log" 2>&1
    rm -f "$OUT/card.txt"; ls -l "$OUT"; cut -c1-300 "$OUT/speed.jsonl"
    [ -z "${REFRESH:-}" ] || grep -v '"sweep' "$OUT/norm_refresh.jsonl" | head -6 ;;
  code)  # inductor's generated modules (from its cache directory: TORCH_LOGS=output_code printed nothing in call 30)
          # and one profiled step (trace kept) of fast DoRA's compiled layers and of Unsloth's compiled LoRA at 4
          # layers: which kernels the DoRA's extra time is in, and what each fuses (bench/kernel_sequence.py)
    export TRINITY_BENCH_PROFILE=$OUT TRINITY_BENCH_TRACE=1 TRINITY_BENCH_PROFILE_CPU=1 TRINITY_BENCH_KEEP_TRACE=1
    python bench/gpu_bench.py build /tmp/m12b 4 > "$OUT/speed.log" 2>&1 || tail -5 "$OUT/speed.log"
    if [ -n "${LORA:-}" ]; then  # Trinity's LoRA layers with lora_in_gemm on every projection (call 37: its attention
      python bench/gpu_bench.py run unsloth /tmp/m12b "$OUT/speed.jsonl" --depths 4 --only lora_acc4 \
        --compile-layers --lora-in-gemm-projections all --tag gemm_layers_ >> "$OUT/speed.log" 2>&1  # kernels 2-4x)
    else
      python bench/gpu_bench.py run unsloth /tmp/m12b "$OUT/speed.jsonl" --depths 4 --only dora_fast_acc4 \
        --compile-layers ${NODOWN:+--no-down-in-graph} --tag layers_ >> "$OUT/speed.log" 2>&1
    fi
    UNSLOTH_COMPILE_DISABLE=0 python bench/gpu_bench.py run unsloth /tmp/m12b "$OUT/speed.jsonl" --depths 4 \
      --only lora_acc4 --tag compiled_ >> "$OUT/speed.log" 2>&1
    find /tmp/torchinductor_* -name "*.py" -size -4M 2>/dev/null | tar czf "$OUT/inductor-code.tar.gz" -T - \
      2>/dev/null
    tar czf "$OUT/prof.tar.gz" -C "$OUT" $(cd "$OUT" && ls prof-*.txt) && rm "$OUT"/prof-*.txt "$OUT/card.txt"
    ls -l "$OUT"; cut -c1-400 "$OUT/speed.jsonl" ;;
  tinyjob)  # run_job's tiny job with compiled decoder layers: its first step stalled in inductor's C++ (CPU)
            # codegen (calls 10, 11); the region's graphs and Dynamo's logs say which tensors are on the CPU
    # (call 12 on: TRINITY_BENCH_REGION_PROBE prints each CPU tensor of the graphs inductor compiles)
    TRINITY_BENCH_COMPILED_LAYERS=1 TRINITY_BENCH_REGION_PROBE=1 TORCH_LOGS=recompiles,graph_breaks \
      timeout -s ABRT ${LIMIT:-300} python -X faulthandler bench/gpu_tiny_job.py train /tmp/tinyjob \
      > "$OUT/tinyjob.log" 2>&1
    echo "rc=$?" | tee -a "$OUT/tinyjob.log"
    grep -n -A4 "\[probe\]" "$OUT/tinyjob.log" | head -60 ;;
  lorajob)  # flex attention's block configs at the 12B shape (bench/flex_configs.py, SWEEP seconds), then run_job's
            # tiny job with LoRA, Unsloth's compile mode chosen by the backend (Trinity's compiled layers on a bf16 GPU)
    timeout ${SWEEP:-200} python bench/flex_configs.py > "$OUT/flex_configs.txt" 2> "$OUT/flex_configs.err"
    echo "flex_configs rc=$?"; cat "$OUT/flex_configs.txt"
    env -u UNSLOTH_COMPILE_DISABLE TRINITY_BENCH_LORA=1 TORCH_LOGS=recompiles,graph_breaks \
      timeout -s ABRT ${LIMIT:-300} python -X faulthandler bench/gpu_tiny_job.py train /tmp/tinyjob \
      > "$OUT/lorajob.log" 2>&1
    echo "rc=$?" | tee -a "$OUT/lorajob.log"
    grep -v "^\s*$" "$OUT/lorajob.log" | grep -i "UNSLOTH_COMPILE_DISABLE\|compile\|backend\|loss\|error\|Traceback" | cut -c1-600 | tail -25 ;;
  *) echo "usage: $0 tests|cudnnsliding|gemms|mmbf16|kernel|kernels|tiles|pair|refresh|t4mem|t4tests|speed|down|downtiles|gemm|loragemm|loraprof|loraproj|loraflex|loracode|lorablocks|masks|lengths|code|tinyjob|lorajob|pattern|nockpt"; exit 2 ;;
esac
