"""One small dataset per seed use case, each with its own field names (plus ShareGPT and OpenAI)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

N = 12  # rows per use case: enough for a 1-row eval split and a few training rows


def _code(i: int) -> dict[str, Any]:
    return {"instruction": f"Write a Python function that adds {i} to its argument.",
            "input": "" if i % 2 else f"Name it add_{i}.",
            "output": f"def add_{i}(x):\n    return x + {i}",
            "prompt": f"### Instruction:\nWrite a Python function that adds {i}...\n### Response:\n"}  # fmt: skip


def _chat(i: int) -> dict[str, Any]:
    turns = [{"role": "system", "content": "You are a friendly assistant."}] if i % 3 == 0 else []
    turns += [{"role": "user", "content": f"Hi, I am user number {i}."},
              {"role": "assistant", "content": f"Hello user {i}! How can I help you today?"},
              {"role": "user", "content": "What is two plus two?"},
              {"role": "assistant", "content": f"Two plus two is four, user {i}."}]  # fmt: skip
    return {"conversations": turns, "id": f"chat-{i}"}


def _medical(i: int) -> dict[str, Any]:
    return {"question": f"What is a normal resting heart rate for patient group {i}?",
            "answer": f"For group {i}, 60 to 100 beats per minute is typical."}  # fmt: skip


def _creative(i: int) -> dict[str, Any]:
    return {"prompt": f"Write a two-sentence story about a lighthouse number {i}.",
            "story": f"Lighthouse {i} blinked all night. In the morning, the fog finally lifted."}  # fmt: skip


def _reasoning(i: int) -> dict[str, Any]:
    return {"problem": f"What is {i} times 3?", "solution": f"{i} times 3 is {3 * i}.",
            "cot": f"Multiply {i} by 3: {i} + {i} + {i} = {3 * i}."}  # fmt: skip


def _sharegpt(i: int) -> dict[str, Any]:
    return {"conversations": [{"from": "system", "value": "Answer briefly."},
                              {"from": "human", "value": f"Name a color, number {i}."},
                              {"from": "gpt", "value": f"Blue is color number {i}."}]}  # fmt: skip


def _openai(i: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"Translate 'cat {i}' to French."},
                         {"role": "assistant", "content": f"'Chat {i}'."}]}  # fmt: skip


# name -> (row builder, expected format, expected mapping, fields the mapping must ignore)
USE_CASES = {
    "code": (_code, "alpaca", {"instruction": "instruction", "output": "output", "input": "input"}, ["prompt"]),
    "chat": (_chat, "conversations", {"conversations": "conversations"}, ["id"]),
    "medical": (_medical, "alpaca", {"question": "instruction", "answer": "output"}, []),
    "creative": (_creative, "alpaca", {"prompt": "instruction", "story": "output"}, []),
    "reasoning": (_reasoning, "alpaca", {"problem": "instruction", "solution": "output"}, ["cot"]),
    "sharegpt": (_sharegpt, "sharegpt", {"conversations": "conversations"}, []),
    "openai": (_openai, "messages", {"messages": "messages"}, []),
}


def rows_for(case: str, n: int = N) -> list[dict[str, Any]]:
    return [USE_CASES[case][0](i) for i in range(n)]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
