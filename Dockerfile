# syntax=docker/dockerfile:1
#
# Trinity's CPU image: the API (default command), and in the compose `cpu` profile a CPU worker
# and the tiny demo. docs/DEPLOY.md explains each choice.
#
# - The API never touches CUDA, so it does not use the GPU image: this one is a fraction of its
#   size, starts faster and runs on a host without a GPU (scale-out: API on a small VM, workers
#   on GPU hosts). The CPU profile needs it anyway: the GPU image's Unsloth pins trl to <= 1.15.0,
#   whose SFTTrainer crashes on a CPU-only torch (docs/DEPLOY.md); here trl is >= 1.16.
# - torch 2.13.0+cpu from the PyTorch CPU index (PyPI's Linux torch is a multi-GB CUDA build).
# - llama-cpp-python compiled in a build stage for a portable x86-64-v3 (AVX2) target.
# - Layers: Python, torch, dependencies (pyproject.toml only), then the source.
# - Non-root user `trinity` (uid 1000); HF_TOKEN only ever comes from the environment.

ARG PYTHON_VERSION=3.12

# ── Python in a venv: shared by the build and runtime stages ─────────────────────────────────
FROM python:${PYTHON_VERSION}-slim-bookworm AS python
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv

# ── build stage: the llama-cpp-python wheel ───────────────────────────────────────────────────
FROM python AS llama
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ make cmake \
 && rm -rf /var/lib/apt/lists/*
# Same pin as pyproject.toml (tests/deploy checks they agree).
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
# GGML_NATIVE=OFF: never -march=native of the build host. Turning it off also turns every SIMD
# option off (ggml/CMakeLists.txt: INS_ENB), so name the x86-64-v3 set explicitly.
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
RUN CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    pip wheel --no-deps --wheel-dir /wheels "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"

# ── runtime ───────────────────────────────────────────────────────────────────────────────────
FROM python AS runtime
ARG UID=1000
# libgomp1: llama.cpp's OpenMP threads.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid "${UID}" --user-group trinity \
 && mkdir -p /data /db /hf /models \
 && chown trinity:trinity /data /db /hf /models

ARG TORCH_VERSION=2.13.0
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
 && python -c "import sys, torch; sys.exit(0 if torch.version.cuda is None else f'torch {torch.__version__} is a CUDA build')" \
 && pip freeze | grep -iE '^torch==' > /opt/torch-constraints.txt \
 && echo 'trl>=1.16' >> /opt/torch-constraints.txt \
 && cat /opt/torch-constraints.txt

# Dependencies + the postgres and tracking (MLflow) extras, from pyproject.toml alone (rebuilt only when they change).
COPY --from=llama /wheels /wheels
COPY pyproject.toml /src/pyproject.toml
RUN python -c "import tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['postgres'] + p['optional-dependencies']['tracking']))" > /tmp/requirements.txt \
 && pip install --find-links /wheels --only-binary llama-cpp-python \
      -r /tmp/requirements.txt -c /opt/torch-constraints.txt \
 && pip check \
 && rm -rf /tmp/requirements.txt /wheels

# The source last. The demo (compose profile `cpu`) also needs its client and the examples.
COPY README.md /src/README.md
COPY trinity_core /src/trinity_core
COPY trinity_service /src/trinity_service
COPY api /src/api
COPY worker /src/worker
COPY cli /src/cli
RUN pip install --no-deps /src && rm -rf /src
COPY examples /app/examples
COPY scripts/demo_client.py /app/scripts/demo_client.py

ENV HF_HOME=/hf TRINITY_DATA_DIR=/data TOKENIZERS_PARALLELISM=false
USER trinity
WORKDIR /home/trinity
EXPOSE 8000
# /health answers only when the API can query its database.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)" || exit 1
# One process; any number may run side by side (the reaper runs in the workers: worker/reaper.py).
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000"]
