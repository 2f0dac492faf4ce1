"""Request dependencies: the principal behind the credentials, the repositories."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

import anyio
from fastapi import Depends, Request

from access import AuditAction
from access.tokens import split_api_key
from storage import AccessRepository, IndexRepository
from web_viewer_api.auth import (
    Authenticator,
    CredentialBlocked,
    CredentialRefused,
    Principal,
    ShareGate,
    UnknownShareToken,
)
from web_viewer_api.errors import Forbidden, NotFound, Unauthorized
from web_viewer_api.loop_reads import read_now

#: The viewer session cookie of a share; its Path is the share's own /s/{token}.
SHARE_COOKIE = "dgw_share_session"


def client_address(request: Request) -> str:
    """The client's address: the peer, or what a listed proxy forwarded for it
    (`web_viewer_api.proxies`, which rewrote the request's client before any route)."""
    return request.client.host if request.client else ""


def _bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized()
    return token.strip()


def _valid_api_key(request: Request, token: str) -> Principal | None:
    """The principal of a valid API key, read on the event loop when the index answers within
    its inline budget (`web_viewer_api.loop_reads`); None otherwise, and always for a key
    that fails: failures are counted (against the key id or the address) in the worker thread."""
    key_id = split_api_key(token)
    if key_id is None:
        return None
    record = read_now(
        request, lambda index: AccessRepository(index.engine).api_key(key_id), "api_key"
    )
    return Authenticator.key_principal(token, key_id, record)  # hashed even when unknown


async def current_principal(request: Request) -> Principal:
    """The caller: a share link under /s/{token}/, else a bearer token (admin token, API
    key, OIDC access token). Secrets are compared in constant time."""
    share_token = request.path_params.get("share_token")
    if share_token is not None:
        gate: ShareGate | None = request.app.state.share_gate
        if gate is None:
            raise NotFound("not found")
        cookie = request.cookies.get(SHARE_COOKIE)
        try:
            principal = await anyio.to_thread.run_sync(
                gate.principal, share_token, cookie, client_address(request)
            )
        except UnknownShareToken:
            request.state.audit = {"action": AuditAction.SHARE_UNKNOWN_TOKEN}
            raise
    else:
        token = _bearer_token(request)
        authenticator: Authenticator = request.app.state.authenticator
        # The credential first, whatever this address did: a valid one is served. Only a
        # failure consults the limiters (counted, and 429 where already blocked).
        found = authenticator.admin(token) or _valid_api_key(request, token)
        if found is None:  # OIDC, a key the index could not answer at once, a failure
            try:
                found = await anyio.to_thread.run_sync(
                    authenticator.authenticate, token, client_address(request)
                )
            except (CredentialRefused, CredentialBlocked) as exc:
                # What the failure counts against, for the limiters of other processes.
                request.state.audit = (
                    {"action": AuditAction.AUTH_KEY_FAILURE, "actor": f"key:{exc.key_id}"}
                    if exc.key_id is not None
                    else {"action": AuditAction.AUTH_INVALID_TOKEN}
                )
                raise
        principal = found
    request.state.principal = principal
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def require_scope(scope: str) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency that admits only principals holding `scope`."""

    async def check(principal: CurrentPrincipal) -> Principal:
        if scope not in principal.scopes:
            raise Forbidden(f"credentials lack the '{scope}' scope")
        return principal

    return check


async def index_repository(request: Request) -> IndexRepository:
    repository: IndexRepository = request.app.state.index
    return repository


IndexDep = Annotated[IndexRepository, Depends(index_repository)]
ReadPrincipal = Annotated[Principal, Depends(require_scope("read"))]
WritePrincipal = Annotated[Principal, Depends(require_scope("write"))]
SharePrincipal = Annotated[Principal, Depends(require_scope("share"))]
AdminPrincipal = Annotated[Principal, Depends(require_scope("admin"))]
