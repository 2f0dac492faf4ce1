"""Request dependencies: the principal behind a bearer token, the repositories."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from storage import IndexRepository
from web_viewer_api.errors import Forbidden, Unauthorized

ALL_SCOPES = frozenset({"read", "write", "share", "admin"})


@dataclass(frozen=True)
class Principal:
    """Who is calling and what they may do."""

    subject: str
    scopes: frozenset[str]


def _bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized()
    return token.strip()


async def current_principal(request: Request) -> Principal:
    """Resolve the bearer token; constant-time comparison with the admin token."""
    token = _bearer_token(request)
    admin_token: str = request.app.state.config.admin_token
    if admin_token and hmac.compare_digest(token.encode(), admin_token.encode()):
        return Principal("admin", ALL_SCOPES)
    raise Unauthorized()


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def require_scope(scope: str) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency that admits only principals holding `scope`."""

    async def check(principal: CurrentPrincipal) -> Principal:
        if scope not in principal.scopes:
            raise Forbidden(f"token lacks the '{scope}' scope")
        return principal

    return check


async def index_repository(request: Request) -> IndexRepository:
    repository: IndexRepository = request.app.state.index
    return repository


IndexDep = Annotated[IndexRepository, Depends(index_repository)]
ReadPrincipal = Annotated[Principal, Depends(require_scope("read"))]
WritePrincipal = Annotated[Principal, Depends(require_scope("write"))]
