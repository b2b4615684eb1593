#!/usr/bin/env bash
# The published checkpoint's path on the lent GPU machine, split into device calls of < 10 minutes
# (the machine stays warm between back-to-back calls, and /tmp/mm with it):
#   bash bench/gpu_mm_calls.sh start    # card, cgroup probe, build the 24-layer stand-in (background),
#                                       # the tiny multimodal GPU tests meanwhile; then starts `run`
#   bash bench/gpu_mm_calls.sh wait     # waits for the run (the job end to end; RAM_LIMIT=1 at start:
#                                       # the whole job in the 8e9-byte cgroup; SKIP_TESTS=1: no pytest)
#   bash bench/gpu_mm_calls.sh export8g # export redone in a fresh process inside a cgroup limited to
#                                       # 8e9 bytes of RAM (page cache included), then waits
# Needs .whl/site (../shared/gpu/wheels.sh) and .gpu-extra/site.tar.gz (bench/gpu_extra.sh) carried.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -d .gpu-extra/site ] || tar xzf .gpu-extra/site.tar.gz -C .gpu-extra  # bench/gpu_extra.sh's tarball
export PYTHONPATH=$PWD/.whl/site:$PWD/.gpu-extra/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
  TOKENIZERS_PARALLELISM=false UNSLOTH_COMPILE_DISABLE=1
OUT=${OUT:-bench/results/gpu-out}
M=/tmp/mm
mkdir -p "$OUT" "$M"
deadline=$((SECONDS + ${BUDGET_S:-560}))

wait_for() {  # wait_for PATTERN: until no process matches or the call's deadline
  while pgrep -f "$1" >/dev/null && [ $SECONDS -lt $deadline ]; do sleep 5; done
  ! pgrep -f "$1" >/dev/null
}

case ${1:-} in
  start)
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; free -g; df -h /tmp; } > "$OUT/card.txt" 2>&1
    { cat /proc/self/cgroup; echo "controllers: $(cat /sys/fs/cgroup/cgroup.controllers 2>&1)";
      mkdir -p /sys/fs/cgroup/trinity8g && echo 8000000000 > /sys/fs/cgroup/trinity8g/memory.max \
        && echo "memory.max: $(cat /sys/fs/cgroup/trinity8g/memory.max)"; } > "$OUT/cgroup.txt" 2>&1
    if [ ! -e $M/model/config.json ]; then
      setsid nohup python bench/gpu_mm_job.py build $M/model --layers 24 > $M/build.log 2>&1 < /dev/null &
    fi
    if [ -z "${SKIP_TESTS:-}" ]; then
      python -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_unsloth_multimodal.py > "$OUT/pytest-multimodal.txt" 2>&1
      tail -5 "$OUT/pytest-multimodal.txt"
    fi
    wait_for "gpu_mm_job.py build" || { echo "build not done"; cp $M/build.log "$OUT/"; exit 3; }
    cp $M/build.log "$OUT/"; tail -2 $M/build.log
    # RAM_LIMIT=1: the whole job inside the 8e9-byte cgroup (page cache charged too, reclaimable)
    ( [ -n "${RAM_LIMIT:-}" ] && echo $BASHPID > /sys/fs/cgroup/trinity8g/cgroup.procs
      exec setsid python bench/gpu_mm_job.py run $M/model $M/job $M/mm_job.json ) > $M/run.log 2>&1 < /dev/null &
    sleep 20; tail -3 $M/run.log ;;
  wait)
    wait_for "gpu_mm_job.py run" || echo "run still going"
    cp $M/run.log "$OUT/mm_job.log"; cp $M/mm_job.json "$OUT/" 2>/dev/null; tail -12 "$OUT/mm_job.log"
    cat /sys/fs/cgroup/trinity8g/memory.events /sys/fs/cgroup/trinity8g/memory.peak > "$OUT/cgroup8g_after.txt" 2>&1 ;;
  export8g)
    rm -rf $M/job/merged $M/job/gguf $M/job/result.json $M/job/report* $M/job/manifest.json
    ( echo $BASHPID > /sys/fs/cgroup/trinity8g/cgroup.procs &&
      exec setsid python bench/gpu_mm_job.py run $M/model $M/job $M/mm_job_8g.json --resume ) > $M/run8g.log 2>&1 < /dev/null &
    sleep 5; wait_for "gpu_mm_job.py run" || echo "run still going"
    cp $M/run8g.log "$OUT/mm_job_8g.log"; cp $M/mm_job_8g.json "$OUT/" 2>/dev/null
    cat /sys/fs/cgroup/trinity8g/memory.events /sys/fs/cgroup/trinity8g/memory.peak > "$OUT/cgroup8g_after.txt" 2>&1
    tail -12 "$OUT/mm_job_8g.log" ;;
  *) echo "usage: $0 start|wait|export8g"; exit 2 ;;
esac
