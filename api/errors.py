"""One error shape everywhere: ``{"error": {"code", "message", "param", "type"[, "details"]}}``,
which is also the shape OpenAI's clients read (``type`` is ``invalid_request_error`` for a 4xx,
``server_error`` for a 5xx).

Handlers cover errors raised by routes (``ApiError``, ``TrinityError``), by FastAPI itself
(request validation, unknown routes, wrong methods) and anything unexpected (500). Under the
OpenAI-compatible prefix ``/v1`` a 422 is answered as 400, as OpenAI does (the SDK raises
``BadRequestError``).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from trinity_service.models import ErrorInfo
from trinity_service.settings import get_settings
from trinity_core.errors import TrinityError

log = logging.getLogger("trinity.api")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, *, param: str | None = None,
                 details: Any = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.param, self.details, self.headers = param, details, headers


class ErrorResponse(BaseModel):
    """The one error shape (documented in the OpenAPI schema for every status below)."""

    error: ErrorInfo


def _doc(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


# Statuses any authenticated route can answer (found by schemathesis: they were undocumented).
AUTHED_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _doc("Malformed request body"), 401: _doc("Missing or invalid API key"),
    404: _doc("Not found (or another tenant's)"), 422: _doc("Invalid request; every problem listed"),
}
UPLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: _doc("Upload over TRINITY_MAX_UPLOAD_MB"), 415: _doc("Not multipart/form-data"),
}


def not_found(what: str, ident: str, param: str | None = None) -> ApiError:
    return ApiError(404, "not_found", f"no {what} {ident!r}", param=param)


def error_body(code: str, message: str, param: str | None = None, details: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message, "param": param}
    if details is not None:
        error["details"] = details
    return {"error": error}


def _loc(loc: tuple | list) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts)


OPENAI_PREFIX = "/v1"


def respond(request: Request, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    """The error response: ``type`` added; under ``/v1`` a 422 becomes OpenAI's 400."""
    if request.url.path.startswith(OPENAI_PREFIX + "/") and status == 422:
        status = 400
    body["error"].setdefault("type", "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(body, status, headers=headers)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return respond(request, exc.status, error_body(exc.code, exc.message, exc.param, exc.details), exc.headers)


async def _trinity_error(request: Request, exc: TrinityError) -> JSONResponse:
    return respond(request, 422, {"error": exc.to_dict()})


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = [{"loc": _loc(e.get("loc", ())), "msg": e.get("msg", "").removeprefix("Value error, ")}
               for e in exc.errors()]
    message = "; ".join(f"{d['loc']}: {d['msg']}" for d in details) or "invalid request"
    return respond(request, 422, error_body("invalid_request", message, details[0]["loc"] if details else None,
                                            details))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    try:
        phrase = HTTPStatus(exc.status_code).phrase
    except ValueError:
        phrase = "error"
    code = phrase.lower().replace(" ", "_").replace("-", "_")
    message = exc.detail if isinstance(exc.detail, str) else phrase
    return respond(request, exc.status_code, error_body(code, message), getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    message = f"{type(exc).__name__}: {exc}" if get_settings().expose_errors else "internal server error"
    return respond(request, 500, error_body("internal_error", message))


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(TrinityError, _trinity_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
