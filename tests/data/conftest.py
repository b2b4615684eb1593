"""Data-stage fixtures: the tiny Gemma-3 tokenizer (real chat template), shared with the rest of the suite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tokenizer_dir(tiny_model_dir: Path) -> Path:
    """The tiny Gemma-3 model dir (tests/conftest.py): its tokenizer has the real Gemma-3 chat template."""
    return tiny_model_dir


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)
