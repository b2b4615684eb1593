"""Atomic writes and the ``artifacts.json`` manifest.

Nothing is ever written under its final name: bytes go to a temp file in the same directory, are
fsynced, then ``os.replace``d into place; directories are built as ``<name>.tmp-xxxx`` and renamed.
A reader (the API serving downloads, a resumed job) therefore sees a complete file or none.
A full disk (``ENOSPC``) or any other ``OSError`` becomes an :class:`ArtifactError` and the temp
file is removed.

The manifest lists every downloadable file of a job's workdir, with a simple unique ``name``:

=============================  ==========  ===================================
name                           kind        path (relative to the workdir)
=============================  ==========  ===================================
``adapter_model.safetensors``  adapter     ``adapter/adapter_model.safetensors``
``adapter_config.json``        adapter     ``adapter/adapter_config.json``
``merged/<file>``              merged      ``merged/<file>`` (weights, config, tokenizer)
``model-f16.gguf``             gguf        ``gguf/model-f16.gguf`` (also q4_k_m, q5_k_m, q8_0)
``mmproj-f16.gguf``            mmproj      ``gguf/mmproj-f16.gguf`` (vision projector of a multimodal base)
``Modelfile``                  modelfile   ``gguf/Modelfile``
``report.md``, ``report.json`` report      ``report/…``
``loss.png``                   plot        ``report/loss.png``
``tensorboard/<file>``         tensorboard ``tensorboard/events.out.tfevents.…`` (``tracking.py``)
``result.json``                result      ``result.json``
=============================  ==========  ===================================
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trinity_core.errors import ArtifactError

MANIFEST = "artifacts.json"
KINDS = ("adapter", "merged", "gguf", "mmproj", "modelfile", "report", "plot", "tensorboard", "result")


def _fail(path: Path, error: OSError) -> ArtifactError:
    if error.errno == errno.ENOSPC:
        return ArtifactError(f"disk full while writing {path}", details={"path": str(path), "errno": "ENOSPC"})
    return ArtifactError(f"cannot write {path}: {error.strerror or error}",
                         details={"path": str(path), "errno": errno.errorcode.get(error.errno or 0)})


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a fsynced temp file in the same directory and ``os.replace``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        raise _fail(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _fail(path, e) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """The parsed JSON at ``path``, or ``None`` if the file does not exist."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for a writer that wants a file name (safetensors, a
    subprocess); on success it is fsynced and renamed to ``path``, on any error removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _fail(path, e) from e
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _fail(path, e) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty ``<path>.tmp-xxxx`` directory; on success replace ``path`` with it.

    An existing ``path`` is removed only after the new directory is complete. On error the temp
    directory is removed and ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise _fail(path, e) from e
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            old = path.with_name(f"{path.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _fail(path, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def entry(workdir: Path, path: Path, *, name: str, kind: str) -> dict[str, Any]:
    """One manifest row for ``path`` (which must be inside ``workdir``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}")
    return {"name": name, "kind": kind, "path": path.relative_to(workdir).as_posix(),
            "size": path.stat().st_size, "sha256": sha256_file(path)}


def _is_final(relative: Path) -> bool:
    """False for temp files (``.x.tmp-…``), temp dirs (``x.tmp-…``, ``x.old-…``) and hidden files."""
    return not any(p.startswith(".") or ".tmp-" in p or ".old-" in p for p in relative.parts)


def build_manifest(workdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Scan the known workdir layout and return manifest rows for every complete file.

    ``merged/`` and ``gguf/`` are only listed once renamed into place (they are built as temp
    directories/files), so a half-finished export never shows up.
    """
    workdir = Path(workdir)
    rows: list[dict[str, Any]] = []

    def add(path: Path, name: str, kind: str) -> None:
        if _is_final(path.relative_to(workdir)) and path.is_file():
            rows.append(entry(workdir, path, name=name, kind=kind))

    for name in ("adapter_model.safetensors", "adapter_config.json"):
        add(workdir / "adapter" / name, name, "adapter")
    merged = workdir / "merged"
    if merged.is_dir():
        for f in sorted(merged.rglob("*")):
            add(f, f"merged/{f.relative_to(merged).as_posix()}", "merged")
    gguf = workdir / "gguf"
    if gguf.is_dir():
        for f in sorted(gguf.glob("*.gguf")):
            add(f, f.name, "mmproj" if f.name.startswith("mmproj") else "gguf")
        add(gguf / "Modelfile", "Modelfile", "modelfile")
    for name in ("report.md", "report.json"):
        add(workdir / "report" / name, name, "report")
    add(workdir / "report" / "loss.png", "loss.png", "plot")
    tensorboard = workdir / "tensorboard"
    if tensorboard.is_dir():
        for f in sorted(tensorboard.rglob("*")):
            add(f, f"tensorboard/{f.relative_to(tensorboard).as_posix()}", "tensorboard")
    add(workdir / "result.json", "result.json", "result")
    return rows


def write_manifest(workdir: str | os.PathLike[str], entries: list[dict[str, Any]] | None = None) -> Path:
    """Write ``workdir/artifacts.json`` (``entries`` or, by default, :func:`build_manifest`)."""
    workdir = Path(workdir)
    rows = build_manifest(workdir) if entries is None else entries
    names = [r["name"] for r in rows]
    if len(names) != len(set(names)):
        raise ArtifactError(f"duplicate artifact names in manifest: {sorted(n for n in names if names.count(n) > 1)}")
    return atomic_write_json(workdir / MANIFEST, rows)


def find_artifact(workdir: str | os.PathLike[str], name: str) -> Path | None:
    """The file behind manifest entry ``name``, or None (for the API's download route)."""
    rows = read_json(Path(workdir) / MANIFEST) or []
    for row in rows:
        if row["name"] == name:
            return Path(workdir) / row["path"]
    return None
