"""The copy-paste examples of docs/API.md, for the tests that run them."""

from __future__ import annotations

import re
from pathlib import Path

API_MD = Path(__file__).resolve().parents[2] / "docs" / "API.md"


def python_block(heading: str) -> str:
    """The first ```python block of the ``## heading`` section."""
    return python_blocks(heading)[0]


def python_blocks(heading: str) -> list[str]:
    """Every ```python block of the ``## heading`` section, in order."""
    text = API_MD.read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, f"no python example under '## {heading}'"
    return blocks
