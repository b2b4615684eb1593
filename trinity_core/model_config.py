"""Find a model's ``config.json`` before anything is queued, fast, or say why it cannot be found.

``resolve(name_or_path, revision)`` looks, in order, at

1. a local directory (a name that starts with ``/``, ``.`` or ``~``, or exists): its config.json;
2. the configs shipped for the models the recipe names (``assets/model_configs``, ``main`` only);
3. the local Hugging Face cache (``HF_HOME``), without touching the network;
4. the hub, only where hub access is allowed (``HF_HUB_OFFLINE`` unset): one request of at most
   ``HUB_TIMEOUT_S``, no retries.

Anything else raises :class:`ModelUnavailable` at once, with the reason and what to do. A job needs
the weights, not only the config: ``need_weights=True`` skips the shipped configs and wants the
weights in the cache too (a local directory is trusted as it is).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trinity_core.errors import ModelUnavailable

SHIPPED_DIR = Path(__file__).parent / "assets" / "model_configs"
HUB_TIMEOUT_S = 5.0
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors")
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size")  # what memory.estimate reads
PARAM = "model.name_or_path"
HOW_TO = ("set TRINITY_MODEL_DIRS and point model.name_or_path at a model directory there, pre-download it "
          "into the Hugging Face cache (huggingface-cli download {name}), or allow hub access (unset HF_HUB_OFFLINE)")


@dataclass
class ResolvedConfig:
    name: str
    source: str  # local | shipped | cache | hub
    where: str  # the file read, or the hub URL
    data: dict[str, Any]


def is_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or _exists(Path(name).expanduser())


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the filesystem, a NUL byte
        return False


def hub_allowed() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() not in {"1", "ON", "YES", "TRUE"}


def resolve(name: str, revision: str | None = None, *, need_weights: bool = False,
            param: str = PARAM) -> ResolvedConfig:
    """Where ``name``'s config.json is, and its content. Raises :class:`ModelUnavailable`."""
    if is_local(name):
        return _local(name, param)
    shipped = SHIPPED_DIR / (name.replace("/", "--") + ".json")
    if not need_weights and revision in (None, "main") and shipped.is_file():
        return ResolvedConfig(name, "shipped", str(shipped), _read(shipped, name, param))
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise _unavailable(f"{name!r} is neither a local directory nor a hub id (namespace/name)",
                           name, "invalid_id", param) from None
    if cached := _cached(name, revision, need_weights):
        return ResolvedConfig(name, "cache", str(cached), _read(cached, name, param))
    if not hub_allowed():
        what = "its config and weights are" if need_weights else "its config is"
        raise _unavailable(f"model {name!r} cannot be used offline: {what} not in the local Hugging Face cache "
                           f"and HF_HUB_OFFLINE is set. To use it, {HOW_TO.format(name=name)}", name,
                           "not_cached", param)
    return _from_hub(name, revision, param)


def load(name: str, revision: str | None = None) -> Any:
    """The config as ``memory.estimate`` reads it: the JSON itself when its (text) config names every
    shape key (no transformers import: milliseconds), else a transformers ``PretrainedConfig``, whose
    model type fills what a short published config leaves out (Google's omit head_dim and vocab_size)."""
    data = resolve(name, revision).data
    if all(key in (data.get("text_config") or data) for key in SHAPE_KEYS):
        return data
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**data)
    except (ValueError, KeyError, TypeError) as e:  # unknown model_type, malformed sub-config
        raise _unavailable(f"the config of {name!r} cannot be read: {e}", name, "bad_config", PARAM) from None


def _local(name: str, param: str) -> ResolvedConfig:
    try:
        path = Path(name).expanduser()
    except RuntimeError:  # ~user that does not exist
        path = Path(name)
    if not _exists(path):
        raise _unavailable(f"no model directory {path}: make it (e.g. `trinity tiny-model {path}`) or fix the path",
                           name, "not_found", param)
    config = path / "config.json"
    if not _exists(config) or not config.is_file():
        raise _unavailable(f"{path} is not a model directory: it has no config.json (one written by "
                           "save_pretrained)", name, "no_config", param)
    return ResolvedConfig(name, "local", str(config), _read(config, name, param))


def _cached(name: str, revision: str | None, need_weights: bool) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    def hit(filename: str) -> str | None:
        found = try_to_load_from_cache(name, filename, revision=revision)
        return found if isinstance(found, str) else None  # None, or a "known not to exist" marker

    config = hit("config.json")
    if config is None or (need_weights and not any(hit(f) for f in WEIGHT_FILES)):
        return None
    return Path(config)


def _from_hub(name: str, revision: str | None, param: str) -> ResolvedConfig:
    """One GET of config.json with a short timeout and no retries (``hf_hub_download`` retries for up
    to a minute when nothing is cached); the hub's answer becomes the reason."""
    import httpx
    from huggingface_hub import hf_hub_url
    from huggingface_hub.errors import (GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    where = name + (f" @ {revision}" if revision else "")
    url = hf_hub_url(name, "config.json", revision=revision, endpoint=os.environ.get("HF_ENDPOINT"))
    try:
        response = get_session().get(url, headers=build_hf_headers(), timeout=HUB_TIMEOUT_S,
                                     follow_redirects=True)
        hf_raise_for_status(response)
        data = response.json()
    except GatedRepoError:
        reason, msg = "gated", f"model {where} is gated: accept its licence on the hub and set HF_TOKEN"
    except RepositoryNotFoundError:
        reason, msg = "not_found", f"no model {where} on the hub (check the id; private models need HF_TOKEN)"
    except RevisionNotFoundError:
        reason, msg = "not_found", f"model {name} has no revision {revision!r}"
    except RemoteEntryNotFoundError:
        reason, msg = "no_config", f"hub repository {where} has no config.json: it is not a transformers model"
    except (httpx.HTTPError, OSError, ValueError) as e:  # unreachable, timed out, 5xx, not JSON
        reason = "hub_unreachable"
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
        msg = f"cannot get the config of {where} from the hub ({error}). Retry later, or {HOW_TO.format(name=name)}"
    else:
        if isinstance(data, dict) and "model_type" in data:
            return ResolvedConfig(name, "hub", url, data)
        reason, msg = "bad_config", f"the config.json of {where} on the hub has no model_type"
    raise _unavailable(msg, name, reason, param)


def _read(path: Path, name: str, param: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _unavailable(f"the config.json of {name!r} ({path}) is unreadable: {e}", name, "bad_config",
                           param) from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise _unavailable(f"the config.json of {name!r} ({path}) has no model_type", name, "bad_config", param)
    return data


def _unavailable(message: str, name: str, reason: str, param: str) -> ModelUnavailable:
    return ModelUnavailable(message, details={"model": name, "reason": reason}, param=param)
