"""Small helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations


def make_spec(spec, **overrides):
    """A copy of a spec with dotted overrides: make_spec(s, **{"train.max_steps": 3})."""
    spec = spec.model_copy(deep=True)
    for dotted, value in overrides.items():
        part, name = dotted.split(".")
        setattr(getattr(spec, part), name, value)
    return spec
