"""Streaming multipart upload: the file part goes straight to a temp file on the data disk.

FastAPI's ``UploadFile`` spools the whole body before a route runs, so it cannot refuse a large
upload early. Here the body is parsed as it arrives (python-multipart's push parser): bytes are
counted while written, and past ``max_bytes`` the temp file is deleted and the rest of the body
is read and dropped (so the client reads a clean 413 instead of a reset) up to ``DRAIN_LIMIT``.
A body that announces itself as too large in Content-Length is refused before it is read.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from api.errors import ApiError

DRAIN_LIMIT = 16 * 2**20  # bytes read and dropped after the limit, so small overshoots get a clean 413
MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 20


@dataclass
class Upload:
    path: Path  # temp file; the caller moves it into place or calls discard()
    filename: str
    size: int
    sha256: str
    fields: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


class _Receiver:
    """python-multipart callbacks: one file part (``file_field``) to disk, small text fields to memory."""

    def __init__(self, tmp_dir: Path, suffix_of, max_bytes: int, file_field: str):  # noqa: ANN001
        self.tmp_dir, self.suffix_of, self.max_bytes, self.file_field = tmp_dir, suffix_of, max_bytes, file_field
        self.fields: dict[str, str] = {}
        self.too_large = False
        self.file = None
        self.path: Path | None = None
        self.filename: str | None = None
        self.size = 0
        self.digest = hashlib.sha256()
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name: str | None = None
        self._is_file = False
        self._data = bytearray()

    # header callbacks
    def on_part_begin(self) -> None:
        self._disposition, self._name, self._is_file, self._data = b"", None, False, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise ApiError(422, "invalid_upload", "a multipart part has no name")
        self._name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            if self._name != self.file_field or self.filename is not None:
                raise ApiError(422, "invalid_upload", f"send exactly one file, in the field {self.file_field!r}",
                               param=self._name)
            self._is_file = True
            self.filename = Path(options[b"filename"].decode("utf-8", "replace").replace("\\", "/")).name
            suffix = self.suffix_of(self.filename)  # raises ApiError for unsupported types
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix="upload-", suffix=suffix, dir=self.tmp_dir)
            self.file, self.path = os.fdopen(fd, "wb"), Path(tmp)
        elif len(self.fields) >= MAX_FIELDS:
            raise ApiError(422, "invalid_upload", f"more than {MAX_FIELDS} form fields")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if not self._is_file:
            self._data += chunk
            if len(self._data) > MAX_FIELD_BYTES:
                raise ApiError(422, "invalid_upload", f"form field {self._name!r} is over 64 KiB", param=self._name)
            return
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.too_large = True
            self.close(discard=True)
        if not self.too_large:
            self.file.write(chunk)
            self.digest.update(chunk)

    def on_part_end(self) -> None:
        if not self._is_file and self._name is not None:
            self.fields[self._name] = self._data.decode("utf-8", "replace")

    def close(self, *, discard: bool = False) -> None:
        if self.file is not None:
            if not discard:
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            self.file = None
        if discard and self.path is not None:
            self.path.unlink(missing_ok=True)


async def receive_upload(request: Request, *, tmp_dir: Path, max_bytes: int, suffix_of,  # noqa: ANN001
                         file_field: str = "file") -> Upload:
    """Parse a multipart/form-data body; the file lands (fsynced) in ``tmp_dir``.

    ``suffix_of(filename)`` returns the temp file's suffix or raises ``ApiError`` (unsupported type).
    Raises ``ApiError`` 413 past ``max_bytes``, 415 for another content type, 422 for a malformed body.
    """
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise ApiError(415, "unsupported_media_type", "send the file as multipart/form-data (field 'file')")
    too_large = ApiError(413, "file_too_large", f"the upload is over the {max_bytes / 2**20:g} MiB limit",
                         param=file_field)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + DRAIN_LIMIT:
        raise too_large

    receiver = _Receiver(tmp_dir, suffix_of, max_bytes, file_field)
    callbacks = {name: getattr(receiver, name) for name in (
        "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished",
        "on_part_data", "on_part_end")}
    parser = MultipartParser(params[b"boundary"], callbacks)
    try:
        async for chunk in request.stream():
            if receiver.too_large:
                if receiver.size > max_bytes + DRAIN_LIMIT:
                    break
                receiver.size += len(chunk)
                continue
            parser.write(chunk)
        if not receiver.too_large:
            parser.finalize()
    except ApiError:
        receiver.close(discard=True)
        raise
    except Exception as error:  # python-multipart's parse errors, a client that went away
        receiver.close(discard=True)
        raise ApiError(422, "invalid_upload", f"malformed multipart body: {error}") from None
    if receiver.too_large:
        raise too_large
    if receiver.path is None:
        raise ApiError(422, "invalid_upload", f"no file in the field {file_field!r}", param=file_field)
    receiver.close()
    return Upload(receiver.path, receiver.filename or "upload", receiver.size, receiver.digest.hexdigest(),
                  receiver.fields)
