"""Exceptions that carry their HTTP status, mapped to the JSON error body in one place."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sql_errors
from starlette.exceptions import HTTPException as StarletteHTTPException

from access.errors import (
    InvalidShareRequest,
    PinCheckBusy,
    ShareEnded,
    ShareError,
    ShareLocked,
    ShareNotFound,
    WrongPin,
)
from storage import IntegrityError, InvalidKey, ObjectNotFound, StorageError

log = logging.getLogger(__name__)

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    410: "gone",
    413: "too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    431: "headers_too_large",
    429: "rate_limited",
    503: "unavailable",
}


class ApiError(Exception):
    """An error the client should see: HTTP status, a stable code, a human message."""

    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ApiError):
    status_code, code = 400, "bad_request"


class Unauthorized(ApiError):
    status_code, code = 401, "unauthorized"

    def __init__(
        self, message: str = "missing or invalid bearer token", *, presented: bool = False
    ) -> None:
        # RFC 6750 §3: error="invalid_token" only when a token was presented.
        challenge = 'Bearer realm="dicom-gateway"' + (
            ', error="invalid_token"' if presented else ""
        )
        super().__init__(message, headers={"WWW-Authenticate": challenge})


class Forbidden(ApiError):
    status_code, code = 403, "forbidden"


class NotFound(ApiError):
    status_code, code = 404, "not_found"


class Gone(ApiError):
    status_code, code = 410, "gone"


class RateLimited(ApiError):
    status_code, code = 429, "rate_limited"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class NotAcceptable(ApiError):
    status_code, code = 406, "not_acceptable"


class TooLargeToRender(ApiError):
    """The resource exists but is over a configured cost limit (a frame too large to render)."""

    status_code, code = 422, "too_large_to_render"


class Unavailable(ApiError):
    status_code, code = 503, "unavailable"

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        headers = None if retry_after is None else {"Retry-After": str(retry_after)}
        super().__init__(message, headers=headers)


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


#: SQLite reports these as OperationalError too, but no retry clears them (a schema not
#: migrated, a read-only file): they are ours to fix, a 500, not the client's 503.
_NOT_TRANSIENT = (
    "no such table",
    "no such column",
    "has no column",
    "readonly database",
    "syntax error",
)


async def api_error_response(_request: Request, exc: ApiError) -> JSONResponse:
    """An ApiError as its status and JSON body."""
    return JSONResponse(error_body(exc.code, exc.message), exc.status_code, headers=exc.headers)


class WrongPinAnswer(ApiError):
    status_code, code = 401, "wrong_pin"


def as_api_error(exc: ShareError) -> ApiError:
    """A share's refusal as the API answers it (status, code, message, headers)."""
    if isinstance(exc, InvalidShareRequest):
        return BadRequest(exc.message)
    if isinstance(exc, ShareNotFound):
        return NotFound(exc.message)
    if isinstance(exc, ShareEnded):
        return Gone(exc.message)
    if isinstance(exc, ShareLocked):
        return Forbidden(exc.message)
    if isinstance(exc, WrongPin):
        return WrongPinAnswer(exc.message)
    if isinstance(exc, PinCheckBusy):
        return RateLimited(exc.message, exc.retry_after or 1)
    return BadRequest(exc.message)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as `{"error": {"code", "message"}}` with its status."""

    app.add_exception_handler(ApiError, api_error_response)  # type: ignore[arg-type]

    @app.exception_handler(ShareError)
    async def _share_error(request: Request, exc: ShareError) -> JSONResponse:
        return await api_error_response(request, as_api_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return JSONResponse(error_body(code, message), exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}"
            for err in exc.errors()
        )
        return JSONResponse(error_body("bad_request", problems or "invalid request"), 400)

    # A dependency down is the client's to retry, and says which: a 503, never a 500.
    retry = {"Retry-After": "5"}

    @app.exception_handler(StorageError)
    async def _storage_error(_request: Request, exc: StorageError) -> JSONResponse:
        if isinstance(exc, ObjectNotFound):
            return JSONResponse(error_body("not_found", "not found"), 404)
        if isinstance(exc, InvalidKey | IntegrityError):
            log.error("object store refused a request: %s", type(exc).__name__)
            return JSONResponse(error_body("internal_error", "internal server error"), 500)
        log.warning("object store unavailable (%s)", type(exc).__name__)
        return JSONResponse(
            error_body("unavailable", "the object store is unavailable; retry later"),
            503,
            headers=retry,
        )

    async def _database_down(_request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, sql_errors.OperationalError) and any(
            sign in str(exc.orig).lower() for sign in _NOT_TRANSIENT
        ):
            log.error("index database error that retrying will not clear (%s)", type(exc).__name__)
            return JSONResponse(error_body("internal_error", "internal server error"), 500)
        log.warning("index database unavailable (%s)", type(exc).__name__)
        return JSONResponse(
            error_body("unavailable", "the index database is unavailable; retry later"),
            503,
            headers=retry,
        )

    for error in (
        sql_errors.OperationalError,
        sql_errors.InterfaceError,
        sql_errors.TimeoutError,
        sql_errors.DisconnectionError,
    ):
        app.add_exception_handler(error, _database_down)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled %s in request", type(exc).__name__)
        return JSONResponse(error_body("internal_error", "internal server error"), 500)
