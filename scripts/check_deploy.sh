#!/usr/bin/env bash
# Checks the deployment files on a machine without a Docker engine (docs/DEPLOY.md, "Checks"):
#
#   1. tests/deploy: compose services, volumes, GPU reservation, healthchecks, start order, the
#      Dockerfiles, .env.example against trinity_service.settings.Settings, the Compose Specification's JSON
#      schema, and Debian's docker-compose 1.29 `config` (apt-get install docker-compose).
#   2. Each image's Python dependency set resolves against the public indexes with the pins read
#      from its Dockerfile: `pip install --dry-run --ignore-installed --report`, Python 3.12 as in
#      the images, this machine's pip configuration (local wheels, caps) switched off. Then every
#      wheel picked must install on the image's glibc and nothing but llama-cpp-python may need
#      compiling (the runtime stages have no C++ compiler).
#
# Needs the network (PyPI; download.pytorch.org when reachable, else PyPI stands in for the
# CUDA/CPU torch builds of the same version, with a warning) and python3.12. ~3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.12}
VENV_PY=${TRINITY_VENV:-.venv}/bin/python
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null \
  || { echo "needs Python 3.12, as in the images: PYTHON=/path/to/python3.12 $0"; exit 1; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)

failed=()
echo "==> 1. tests/deploy"
"$VENV_PY" -m pytest -q tests/deploy || failed+=("tests/deploy")

echo "==> 2. the images' dependency sets (pip install --dry-run, $("$PY" --version))"
# This machine's pip config adds local wheel directories and caps torch: the images see neither.
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
unset PIP_FIND_LINKS PIP_CONSTRAINT PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_NO_INDEX
"$PY" -m venv "$WORK/venv"
PIP="$WORK/venv/bin/pip"
"$PIP" install -q --upgrade pip

arg() { sed -nE "s/^ARG $2=\"?([^\"]*)\"?$/\1/p" "$1" | head -1; }
TORCH=$(arg Dockerfile.gpu TORCH_VERSION)
TORCHVISION=$(arg Dockerfile.gpu TORCHVISION_VERSION)
XFORMERS=$(arg Dockerfile.gpu XFORMERS_VERSION)
CUDA=$(arg Dockerfile.gpu TORCH_CUDA)
CPU_TORCH=$(arg Dockerfile TORCH_VERSION)
PYPI=https://pypi.org/simple
TORCH_INDEX=https://download.pytorch.org/whl
echo "    pins from the Dockerfiles: torch $TORCH+$CUDA, torchvision $TORCHVISION, xformers $XFORMERS; CPU torch $CPU_TORCH+cpu"

dry_run() {  # name, then pip arguments; writes $WORK/name.json and name.log
  local name=$1; shift
  local t0; t0=$(date +%s)
  if "$PIP" install --dry-run --ignore-installed --report "$WORK/$name.json" "$@" >"$WORK/$name.log" 2>&1; then
    echo "    $name: resolved in $(( $(date +%s) - t0 ))s"
  else
    echo "    $name: FAILED after $(( $(date +%s) - t0 ))s"; tail -25 "$WORK/$name.log"; return 1
  fi
}

if curl -sf --max-time 15 "$TORCH_INDEX/$CUDA/torch/" -o /dev/null && curl -sf --max-time 15 "$TORCH_INDEX/cpu/torch/" -o /dev/null; then
  # As the Dockerfiles do: torch (+ torchvision, xformers) from the PyTorch index first, then the
  # project from PyPI with those builds pinned exactly.
  dry_run gpu-torch --index-url "$TORCH_INDEX/$CUDA" "torch==$TORCH" "torchvision==$TORCHVISION" "xformers==$XFORMERS"
  pins=$("$WORK/venv/bin/python" -c "import json, sys; r = json.load(open(sys.argv[1])); print(' '.join(f\"{i['metadata']['name']}=={i['metadata']['version']}\" for i in r['install'] if i['metadata']['name'].lower() in ('torch', 'torchvision', 'xformers', 'triton')))" "$WORK/gpu-torch.json")
  echo "    from $TORCH_INDEX/$CUDA: $pins"
  # shellcheck disable=SC2086
  dry_run gpu --index-url "$PYPI" --extra-index-url "$TORCH_INDEX/$CUDA" ".[gpu,postgres]" $pins &
  gpu=$!
  dry_run cpu --index-url "$PYPI" --extra-index-url "$TORCH_INDEX/cpu" ".[postgres]" "torch==$CPU_TORCH+cpu" "trl>=1.16" &
  cpu=$!
else
  echo "    WARNING: download.pytorch.org is not reachable from here: PyPI's torch $TORCH (a CUDA 13"
  echo "    build) stands in for $TORCH+$CUDA and +cpu. Same versions and dependency metadata apart"
  echo "    from the nvidia-* packages; that the $CUDA builds exist is checked only by docker build."
  dry_run gpu --index-url "$PYPI" ".[gpu,postgres]" "torch==$TORCH" "torchvision==$TORCHVISION" "xformers==$XFORMERS" &
  gpu=$!
  dry_run cpu --index-url "$PYPI" ".[postgres]" "torch==$CPU_TORCH" "trl>=1.16" &
  cpu=$!
fi
wait $gpu || failed+=("gpu dependency set")
wait $cpu || failed+=("cpu dependency set")

if [ -s "$WORK/gpu.json" ] && [ -s "$WORK/cpu.json" ]; then "$WORK/venv/bin/python" - "$WORK" <<'EOF' || failed+=("wheel checks")
"""Summarise both reports; fail on a wheel the image's glibc cannot load or an unexpected sdist."""
import json, re, sys
from pathlib import Path


def version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


work = Path(sys.argv[1])
images = {"gpu": ("Dockerfile.gpu, Ubuntu 22.04", (2, 35)), "cpu": ("Dockerfile, Debian 12", (2, 36))}
key = ["torch", "torchvision", "xformers", "triton", "unsloth", "unsloth_zoo", "trl", "transformers", "peft",
       "datasets", "bitsandbytes", "accelerate", "llama_cpp_python", "celery", "fastapi", "psycopg2-binary"]
problems = []
for name, (image, glibc) in images.items():
    report = json.loads((work / f"{name}.json").read_text())
    versions, sdists = {}, []
    for item in report["install"]:
        meta, url = item["metadata"], item["download_info"]["url"]
        versions[meta["name"].lower().replace("-", "_")] = meta["version"]
        file = url.rsplit("/", 1)[-1]
        if file.endswith((".tar.gz", ".zip")):
            sdists.append(meta["name"])
        tags = [tuple(map(int, t)) for t in re.findall(r"manylinux_(\d+)_(\d+)", file)]
        if tags and min(tags) > glibc:
            problems.append(f"{name}: {file} needs glibc {min(tags)}, the image has {glibc}")
    unexpected = [s for s in sdists if s.lower().replace("-", "_") != "llama_cpp_python"]
    if unexpected:
        problems.append(f"{name}: would compile {unexpected} (no compiler in the runtime stage)")
    shown = ", ".join(f"{k} {versions[k.lower().replace('-', '_')]}" for k in key
                      if k.lower().replace("-", "_") in versions)
    print(f"    {name} ({image}): {len(report['install'])} packages; {shown}")
for name in images:
    report = json.loads((work / f"{name}.json").read_text())
    trl_version = next(i["metadata"]["version"] for i in report["install"] if i["metadata"]["name"] == "trl")
    if not (version(trl_version) <= (1, 15, 0) if name == "gpu" else version(trl_version) >= (1, 16)):
        problems.append(f"{name}: trl {trl_version} (gpu: unsloth needs <=1.15.0; cpu: >=1.16 runs on a CPU torch)")
for p in problems:
    print(f"    PROBLEM {p}")
sys.exit(1 if problems else 0)
EOF
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "==> FAILED: ${failed[*]} ($(( $(date +%s) - started ))s)"; exit 1
fi
echo "==> deploy checks passed in $(( $(date +%s) - started ))s"
