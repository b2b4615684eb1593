"""Shared fixtures: the tiny Gemma-3 is built once and trained once per test session; many
tests read that run's outputs instead of training again (2 cores, 90 minutes of CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_SPEC = ROOT / "examples" / "tiny.yaml"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# MLflow 3 refuses its (maintenance-mode) file store without this; the tests track into file:// stores
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from trinity_core.fixtures.tiny import build_tiny_model

    return Path(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def tiny_spec(tiny_model_dir):
    """examples/tiny.yaml pointed at this session's tiny model."""
    from trinity_core.spec import load_spec

    spec = load_spec(TINY_SPEC)
    spec.model.name_or_path = str(tiny_model_dir)
    return spec


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """A local MLflow file store (``file:///…``) the session's trained run also logs to."""
    return tmp_path_factory.mktemp("mlruns").as_uri()


@pytest.fixture(scope="session")
def trained_run(tiny_spec, tmp_path_factory, mlflow_uri):
    """The tiny recipe run once, end to end, tracked in TensorBoard and in ``mlflow_uri``:
    (JobResult, workdir, events)."""
    from trinity_core.options import RunOptions
    from trinity_core.pipeline import run_job

    workdir = tmp_path_factory.mktemp("run")
    events = []
    result = run_job(tiny_spec, workdir, events.append, options=RunOptions(mlflow_tracking_uri=mlflow_uri))
    return result, workdir, events
