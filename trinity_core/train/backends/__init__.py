"""Training backends behind one small Protocol, chosen in one place (:func:`select`).

``peft``: transformers + bitsandbytes 4-bit + PEFT LoRA/rsLoRA/DoRA; runs on CPU and any GPU.
``unsloth``: Unsloth's FastLanguageModel; CUDA only, imported lazily in ``backends/unsloth.py``.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Protocol

from trinity_core import gpu
from trinity_core.errors import BackendUnavailable
from trinity_core.options import RunOptions
from trinity_core.spec import JobSpec


class Backend(Protocol):
    name: str

    def load(self, spec: JobSpec, tokenizer: Any = None) -> tuple[Any, Any]:
        """Return ``(model, tokenizer)``: the 4-bit base with adapters applied, ready for TRL.
        ``tokenizer``: one already loaded for this model (the data stage's), used when the backend can."""
        ...

    def info(self) -> dict[str, Any]:
        """What was chosen and why (compile mode, dtype...), recorded in result.json."""
        ...


def unsloth_installed() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def select(spec: JobSpec, options: RunOptions | None = None) -> Backend:
    """The one place a backend is chosen. ``auto``: unsloth when CUDA and the gpu extra exist."""
    options = options or RunOptions()
    wanted = spec.model.backend
    if wanted == "auto":
        wanted = "unsloth" if gpu.available() and unsloth_installed() else "peft"
    if wanted == "unsloth":
        if not gpu.available():
            raise BackendUnavailable("backend 'unsloth' needs a CUDA GPU; use backend 'peft' or 'auto'",
                                     param="model.backend")
        if not unsloth_installed():
            raise BackendUnavailable("backend 'unsloth' needs the gpu extra: pip install 'trinity[gpu]'",
                                     param="model.backend")
        from trinity_core.train.backends.unsloth import UnslothBackend

        return UnslothBackend(spec, options)
    from trinity_core.train.backends.peft import PeftBackend

    return PeftBackend(options)
