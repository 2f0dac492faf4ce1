"""DICOMweb Studies Service routes (PS3.18), one module per transaction as Orthanc's plugin
cuts them: `qido`, `wado`, `rendered`, `stow` over the query/retrieve service; `common`
for what they share. Their errors are mapped once, here (`install_error_handlers`)."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from web_viewer_api.dicomweb.qido import QueryParameterError
from web_viewer_api.dicomweb.wado import (
    NotAcceptableError,
    NotFoundError,
    TooLargeToRenderError,
    WadoError,
)
from web_viewer_api.errors import (
    ApiError,
    BadRequest,
    NotAcceptable,
    NotFound,
    TooLargeToRender,
    api_error_response,
)
from web_viewer_api.routes.dicomweb import qido, rendered, stow, wado

_TRANSACTIONS = (qido, wado, rendered, stow)
router = APIRouter()
for _transaction in _TRANSACTIONS:  # their routes as they are (each names its full path)
    router.routes.extend(_transaction.router.routes)


def install_error_handlers(app: FastAPI) -> None:
    """DICOMweb's own errors, mapped once to the JSON error body: a bad query parameter or
    UID 400, not found 404, no acceptable representation 406, too large to render 422."""

    @app.exception_handler(QueryParameterError)
    async def _query_error(request: Request, exc: QueryParameterError) -> JSONResponse:
        return await api_error_response(request, BadRequest(str(exc)))

    @app.exception_handler(WadoError)
    async def _wado_error(request: Request, exc: WadoError) -> JSONResponse:
        answer: ApiError = BadRequest(str(exc))
        if isinstance(exc, NotFoundError):
            answer = NotFound("not found")
        elif isinstance(exc, NotAcceptableError):
            answer = NotAcceptable(str(exc))
        elif isinstance(exc, TooLargeToRenderError):
            answer = TooLargeToRender(str(exc))
        return await api_error_response(request, answer)


def share_router() -> APIRouter:
    """The read-only DICOMweb root of a share, /s/{share_token}/dicom-web: the same GET
    resources, answered within the share's scope (principal resolved from the token)."""
    scoped = APIRouter(prefix="/s/{share_token}/dicom-web", tags=["Shares"])
    for route in (r for transaction in _TRANSACTIONS for r in transaction.router.routes):
        if isinstance(route, APIRoute) and route.methods == {"GET"}:
            scoped.add_api_route(
                route.path.removeprefix("/dicom-web"),
                route.endpoint,
                methods=["GET"],
                name=f"share_{route.name}",
                include_in_schema=False,
            )
    return scoped


__all__ = ["install_error_handlers", "router", "share_router"]
