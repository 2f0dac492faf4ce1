"""Bounds on the request line and headers, checked before any route runs.

uvicorn's default HTTP parser (httptools) accepts a request line and headers of any length;
this middleware, the outermost of the application, answers a URL longer than
`RequestLimits.max_url_bytes` with 414 and headers over their limits with 431, each with the
JSON error body — on every route, share links and the viewer included.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from web_viewer_api.errors import error_body


@dataclass(frozen=True)
class RequestLimits:
    """The largest request line and headers served (bytes as received, percent-encoded)."""

    #: Path and query string together (the target of the request line).
    max_url_bytes: int = 8 * 1024
    #: All header names and values together.
    max_header_bytes: int = 16 * 1024
    #: One header's name and value.
    max_single_header_bytes: int = 8 * 1024
    #: Header lines.
    max_header_count: int = 100

    def __post_init__(self) -> None:
        if (
            min(
                self.max_url_bytes,
                self.max_header_bytes,
                self.max_single_header_bytes,
                self.max_header_count,
            )
            < 1
        ):
            raise ValueError("request limits must be positive")

    def refusal(self, scope: Scope) -> tuple[int, str, str] | None:
        """(status, code, message) when the request is over a limit, else None."""
        raw_path = scope.get("raw_path") or scope.get("path", "").encode()
        url = len(raw_path) + len(scope.get("query_string", b""))
        if url > self.max_url_bytes:
            return 414, "uri_too_long", f"the URL is longer than {self.max_url_bytes} bytes"
        headers = scope.get("headers", [])
        if len(headers) > self.max_header_count:
            return (431, "headers_too_large", f"more than {self.max_header_count} header fields")
        total = 0
        for name, value in headers:
            size = len(name) + len(value)
            if size > self.max_single_header_bytes:
                return (
                    431,
                    "headers_too_large",
                    f"a header field is longer than {self.max_single_header_bytes} bytes",
                )
            total += size
        if total > self.max_header_bytes:
            return (
                431,
                "headers_too_large",
                f"the header fields are longer than {self.max_header_bytes} bytes together",
            )
        return None


class RequestLimitsMiddleware:
    """Refuses, before the application sees it, a request whose URL or headers are over
    `limits` (pure ASGI: nothing of the body is read)."""

    def __init__(self, app: ASGIApp, limits: RequestLimits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refused = self.limits.refusal(scope)
            if refused is not None:
                status, code, message = refused
                # Not stored: the same URL may be fine once the limits change.
                response = JSONResponse(
                    error_body(code, message), status, headers={"Cache-Control": "no-store"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
