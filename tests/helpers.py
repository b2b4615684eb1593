"""Small helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations


def make_spec(spec, **overrides):
    """A copy of a spec with dotted overrides: make_spec(s, **{"train.max_steps": 3})."""
    spec = spec.model_copy(deep=True)
    for dotted, value in overrides.items():
        part, name = dotted.split(".")
        setattr(getattr(spec, part), name, value)
    return spec


def cache_hub_model(cache_dir, repo_id: str, files: dict[str, str]) -> None:
    """Lay ``repo_id`` out in a Hugging Face cache as a download would (refs/main → a snapshot)."""
    repo, commit = cache_dir / ("models--" + repo_id.replace("/", "--")), "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, text in files.items():
        (repo / "snapshots" / commit / name).write_text(text)
