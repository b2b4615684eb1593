"""Row formats -> one canonical chat form: ``{"messages": [{"role", "content"}, ...]}``.

Four formats are understood:

- ``alpaca``: ``instruction`` / ``input`` / ``output`` (optional ``system``); any field names can be
  mapped onto these roles (question -> instruction, answer -> output ...).
- ``conversations``: a ``conversations`` list of ``{role, content}`` turns.
- ``sharegpt``: a ``conversations`` list of ``{from, value}`` turns (human / gpt / system ...).
- ``messages``: OpenAI chat fine-tuning rows, a ``messages`` list of ``{role, content}`` turns.

``resolve_mapping`` looks at the first rows once and decides the format and the field mapping;
``to_messages`` then converts each row, returning every problem it finds instead of raising.
Fields the mapping does not use (ids, a pre-rendered ``prompt`` or ``text``, a ``cot``) are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

FORMATS = ("alpaca", "conversations", "sharegpt", "messages")
ROLES = ("system", "user", "assistant")
# Role fields a source field can be mapped onto; aliases resolve to the canonical name.
ROLE_FIELDS = ("instruction", "input", "output", "system", "conversations", "messages")
ROLE_ALIASES = {"prompt": "instruction", "response": "output"}
CHAT_FIELDS = ("conversations", "messages")
# Common field names proposed for each role, best first. A field already used elsewhere is skipped,
# so a dataset with instruction/input/output and an extra pre-rendered ``prompt`` keeps ``prompt`` out.
AUTO_NAMES = {
    "instruction": ("instruction", "prompt", "question", "problem", "query", "task", "request"),
    "output": ("output", "response", "answer", "completion", "story", "solution", "target", "reply"),
    "input": ("input", "context"),
    "system": ("system", "system_prompt"),
}
CHAT_NAMES = ("messages", "conversations", "conversation", "dialog", "dialogue", "turns")
# Role names seen in the wild -> canonical role. ShareGPT uses human/gpt; Gemma uses model.
ROLE_NAMES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant",
}  # fmt: skip


@dataclass
class Problem:
    """One thing wrong with a row. ``kind`` groups problems for counting and capping."""

    kind: str
    field: str | None
    message: str


@dataclass
class Mapping:
    """The decided format and ``{source_field: role_field}``; ``problems`` are mapping errors."""

    format: str | None
    fields: dict[str, str] = field(default_factory=dict)
    note: str = ""
    problems: list[Problem] = field(default_factory=list)

    def source_of(self, role: str) -> str | None:
        return self._sources.get(role)

    @cached_property
    def chat_field(self) -> str | None:
        """The source field holding the list of turns (chat formats)."""
        return next((s for s, d in self.fields.items() if d in CHAT_FIELDS), None)

    @cached_property
    def _sources(self) -> dict[str, str]:  # role -> source field, computed once: called per row
        return {dst: src for src, dst in reversed(self.fields.items())}


def resolve_mapping(
    sample: list[dict[str, Any]], *, format: str = "auto", columns: dict[str, str] | None = None
) -> Mapping:
    """Decide the format and the field mapping from the first rows (and ``columns``, if given).

    Explicit ``columns`` win; the rest is proposed from common field names. Every mapping problem
    (a target that is not a role, a mapped field absent from the data, no assistant field) is
    returned in ``Mapping.problems``, each naming the field.
    """
    columns = dict(columns or {})
    keys: list[str] = []
    for row in sample:
        keys += [k for k in row if k not in keys]
    problems: list[Problem] = []
    fields: dict[str, str] = {}
    for src, dst in columns.items():
        role = ROLE_ALIASES.get(dst, dst)
        if role not in ROLE_FIELDS:
            problems.append(Problem("bad_mapping", src, f"columns: {src!r} -> {dst!r}: {dst!r} is not a role "
                                    f"field; use one of {', '.join(ROLE_FIELDS + tuple(ROLE_ALIASES))}"))
        elif role in fields.values():
            other = next(s for s, d in fields.items() if d == role)
            problems.append(Problem("bad_mapping", src, f"columns: {other!r} and {src!r} are both mapped to {role!r}"))
        else:
            fields[src] = role
        if sample and src not in keys:
            problems.append(Problem("bad_mapping", src, f"columns: {src!r} is not a field of the data "
                                    f"(fields in the first {len(sample)} rows: {', '.join(keys) or 'none'})"))
    if format not in ("auto",) + FORMATS:
        problems.append(Problem("bad_mapping", None, f"unknown format {format!r}; use auto or {', '.join(FORMATS)}"))
        return Mapping(None, fields, "", problems)

    chat_src = next((s for s, d in fields.items() if d in CHAT_FIELDS), None)
    wants_chat = format in ("conversations", "sharegpt", "messages") or chat_src is not None
    if chat_src is None and format != "alpaca" and not any(d in AUTO_NAMES for d in fields.values()):
        chat_src = next((k for k in CHAT_NAMES if k in keys and k not in fields and _is_list(sample, k)), None)
        if chat_src is None and wants_chat:
            chat_src = next((k for k in CHAT_NAMES if k in keys and k not in fields), None)
        if chat_src is not None:
            fields[chat_src] = "messages" if chat_src == "messages" else "conversations"
    auto = [s for s in fields if s not in columns]

    if chat_src is not None or wants_chat:
        if chat_src is None:
            problems.append(Problem("bad_mapping", None, "no conversation field found (looked for "
                                    f"{', '.join(CHAT_NAMES)}); map one with columns, e.g. {{dialog: conversations}}"))
            return Mapping(format if format != "auto" else None, fields, "", problems)
        fmt = format if format != "auto" else _chat_style(sample, chat_src, fields[chat_src])
    else:
        fmt = "alpaca"
        used = set(fields)
        for role in ("instruction", "output", "input", "system"):
            if role in fields.values():
                continue
            name = next((k for k in AUTO_NAMES[role] if k in keys and k not in used), None)
            if name is None and role == "instruction" and "input" in keys and "input" not in used:
                name = "input"  # input/output pairs: the input is the instruction
            if name is not None:
                fields[name] = role
                used.add(name)
                auto.append(name)
        for role, needed in (("instruction", "the user turn"), ("output", "the assistant reply")):
            if role not in fields.values():
                problems.append(Problem("bad_mapping", role, f"no field for {needed} ({role}): tried "
                                        f"{', '.join(AUTO_NAMES[role])}; fields are {', '.join(keys) or 'none'}. "
                                        f"Map one with columns, e.g. {{my_field: {role}}}"))
    ignored = [k for k in keys if k not in fields]
    parts = [f"{s} -> {d}" + (" (auto)" if s in auto else "") for s, d in fields.items()]
    note = f"{fmt} format: " + ", ".join(parts)
    if ignored:
        note += f"; ignored fields: {', '.join(ignored)}"
    return Mapping(fmt, fields, note, problems)


def _is_list(sample: list[dict[str, Any]], key: str) -> bool:
    return any(isinstance(row.get(key), list) for row in sample)


def _chat_style(sample: list[dict[str, Any]], src: str, role_field: str) -> str:
    for row in sample:
        turns = row.get(src)
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            if "from" in turns[0] or "value" in turns[0]:
                return "sharegpt"
            break
    return "messages" if role_field == "messages" else "conversations"


def to_messages(row: Any, mapping: Mapping) -> tuple[list[dict[str, str]] | None, list[Problem]]:
    """Convert one row to canonical messages. Returns ``(messages or None, problems)``."""
    if not isinstance(row, dict):
        return None, [Problem("wrong_type", None, f"expected an object per row, got {_type(row)}")]
    if mapping.format == "alpaca":
        messages, problems = _from_alpaca(row, mapping)
    else:
        messages, problems = _from_chat(row, mapping)
    if messages is not None:
        problems += _check_turns(messages, mapping)
    return (None if problems else messages), problems


def _from_alpaca(row: dict[str, Any], mapping: Mapping) -> tuple[list[dict[str, str]] | None, list[Problem]]:
    problems, values = [], {}
    for role in ("instruction", "input", "output", "system"):
        src = mapping.source_of(role)
        if src is None:
            continue
        value = row.get(src)
        if value is None:
            if role in ("instruction", "output"):
                problems.append(Problem("missing_field", src, "missing field"))
        elif not isinstance(value, str):
            problems.append(Problem("wrong_type", src, f"expected a string, got {_type(value)}"))
        else:
            values[role] = value
    if problems:
        return None, problems
    user = values["instruction"]
    if values.get("input", "").strip():
        user = f"{user}\n\n{values['input']}" if user.strip() else values["input"]
    messages = []
    if values.get("system", "").strip():
        messages.append({"role": "system", "content": values["system"]})
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": values["output"]}]
    return messages, []


def _from_chat(row: dict[str, Any], mapping: Mapping) -> tuple[list[dict[str, str]] | None, list[Problem]]:
    src = mapping.chat_field
    turns = row.get(src)
    if turns is None:
        return None, [Problem("missing_field", src, "missing field")]
    if not isinstance(turns, list):
        return None, [Problem("wrong_type", src, f"expected a list of turns, got {_type(turns)}")]
    role_key, text_key = ("from", "value") if mapping.format == "sharegpt" else ("role", "content")
    problems, messages = [], []
    for i, turn in enumerate(turns):
        where = f"{src}[{i}]"
        if not isinstance(turn, dict):
            problems.append(Problem("wrong_type", where, f"expected an object, got {_type(turn)}"))
            continue
        role, text = turn.get(role_key), turn.get(text_key)
        for key, value in ((role_key, role), (text_key, text)):
            if value is None and not (key == text_key and ROLE_NAMES.get(role) == "assistant"):
                problems.append(Problem("missing_field", f"{where}.{key}", "missing field"))
            elif value is not None and not isinstance(value, str):
                problems.append(Problem("wrong_type", f"{where}.{key}", f"expected a string, got {_type(value)}"))
        if isinstance(role, str) and role.lower() not in ROLE_NAMES:
            problems.append(Problem("unknown_role", f"{where}.{role_key}", f"unknown role {role!r}; expected "
                                    "system, user or assistant (or human, gpt, model)"))
        if isinstance(role, str) and role.lower() in ROLE_NAMES and (text is None or isinstance(text, str)):
            messages.append({"role": ROLE_NAMES[role.lower()], "content": text or "", "_field": f"{where}.{text_key}"})
    if problems:
        return None, problems
    return messages, []


def _check_turns(messages: list[dict[str, str]], mapping: Mapping) -> list[Problem]:
    """Empty turns, a missing assistant turn and role order (what a chat template would reject)."""
    problems = []
    chat_field = mapping.chat_field
    for m in messages:
        where = m.pop("_field", None) or (mapping.source_of("output") if m["role"] == "assistant"
                                           else mapping.source_of("instruction") if m["role"] == "user" else None)
        if not m["content"].strip():
            kind = "empty_assistant" if m["role"] == "assistant" else "empty_turn"
            problems.append(Problem(kind, where, f"empty {m['role']} turn"))
    if not any(m["role"] == "assistant" for m in messages):
        problems.append(Problem("no_assistant", chat_field, "no assistant turn"))
        return problems
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * len(body)
    if "system" in body or body != expected[: len(body)]:
        problems.append(Problem("role_order", chat_field, "roles must be user/assistant alternating, starting "
                                f"with user, after an optional first system turn; got {'/'.join(roles)}"))
    return problems


def _type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )
