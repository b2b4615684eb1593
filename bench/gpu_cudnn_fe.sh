#!/usr/bin/env bash
# NVIDIA's cudnn-frontend for the lent GPU machine (Python 3.12, CUDA 13): the wheel itself, 11.6 MB, into
# .gpu-cudnn/ (git-ignored through .git/info/exclude), small enough to travel beside .whl/site (41 MB) in one device
# call's 64 MiB; unpacked there by bench/gpu_session_calls.sh into .gpu-cudnn/site, on PYTHONPATH after .whl/site.
# Without its optional dependencies (cutlass DSL, tvm-ffi: its own Python kernels, not needed for cuDNN's library
# engines). It gives trinity_core.train.dense_attention's SLIDING_KERNEL = "cudnn" its op (torch.ops.cudnn.sdpa_fwd).
#   bash bench/gpu_cudnn_fe.sh   # then carry [".whl/site", ".gpu-cudnn"]
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-common-dir)/info/exclude
grep -qx '/.gpu-cudnn/' "$exclude" 2>/dev/null || echo '/.gpu-cudnn/' >> "$exclude"
rm -rf .gpu-cudnn && mkdir -p .gpu-cudnn
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  -d .gpu-cudnn "nvidia-cudnn-frontend==${CUDNN_FE_VERSION:-1.32.0}"
ls -la .gpu-cudnn
