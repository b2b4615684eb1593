"""A wrapper put in front of one entry of a transformers interface (``ALL_ATTENTION_FUNCTIONS``,
``ALL_MASK_ATTENTION_FUNCTIONS``): once, found again, taken away. Those interfaces are one object each for the
process, so a front serves every model of it. The mask cache (``train/block_masks``) and the dense attention
(``train/dense_attention``) are installed this way."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def _interface(where: str) -> Any:
    """``"module:NAME"`` → the interface object, None where transformers has none."""
    module, _, name = where.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def install(where: str, key: str, front: Callable[[Any], Any]) -> Any:
    """``front(current)`` put in front of ``interface[key]`` (the one already there if it is of that type); None
    where the interface or the entry does not exist. ``front`` is the wrapper's class."""
    interface = _interface(where)
    try:
        current = interface[key] if interface is not None else None
    except KeyError:
        return None
    if current is None or isinstance(current, front):
        return current
    wrapped = front(current)
    interface[key] = wrapped
    return wrapped


def installed(where: str, key: str, front: type) -> Any:
    """The ``front`` instance in front of ``interface[key]``, if one is there."""
    interface = _interface(where)
    try:
        current = interface[key] if interface is not None else None
    except KeyError:
        return None
    return current if isinstance(current, front) else None


def uninstall(where: str, key: str, front: type, inner: str) -> None:
    """The wrapped function (the front's attribute ``inner``) back in ``interface[key]`` (tests)."""
    current = installed(where, key, front)
    if current is not None:
        _interface(where)[key] = getattr(current, inner)


__all__ = ["install", "installed", "uninstall"]
