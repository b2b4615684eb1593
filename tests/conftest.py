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
def trained_run(tiny_spec, tmp_path_factory):
    """The tiny recipe run once, end to end: (JobResult, workdir, events)."""
    from trinity_core.pipeline import run_job

    workdir = tmp_path_factory.mktemp("run")
    events = []
    result = run_job(tiny_spec, workdir, events.append)
    return result, workdir, events
