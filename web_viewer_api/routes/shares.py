"""/api/shares (create, list, inspect with its access log, revoke); the former /api/studies/lookup
answers where lookups went (web_viewer_api.routes.site)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from access import (
    AccessLogEntry,
    AuditAction,
    ShareCreate,
    ShareCreated,
    SharePublic,
    ShareService,
    audit_entry,
    share_audit_detail,
)
from storage import AuditQuery
from web_viewer_api.deps import SharePrincipal
from web_viewer_api.errors import BadRequest, NotFound, Unavailable
from web_viewer_api.lookup import COMPUTED_AT_THE_SITE
from web_viewer_api.notify import NotificationError, send, share_message

router = APIRouter(prefix="/api", tags=["Shares"])


def _service(request: Request) -> ShareService:
    service: ShareService | None = request.app.state.share_service
    if service is None:
        raise Unavailable("shares are not configured")
    return service


def _base_url(request: Request) -> str:
    configured: str | None = request.app.state.config.public_url
    return configured or str(request.base_url)


def _audit(request: Request, action: str, **notes: Any) -> None:
    request.state.audit = {"action": action, **notes}


@router.post(
    "/shares",
    status_code=201,
    response_model=ShareCreated,
    summary="Create a share link (the URL is shown once)",
)
def create_share(body: ShareCreate, request: Request, principal: SharePrincipal) -> JSONResponse:
    service = _service(request)
    if body.notify and not body.recipient_email:
        raise BadRequest("notify needs recipient_email")
    smtp = request.app.state.config.smtp
    if body.notify and smtp is None:
        raise BadRequest("e-mail notification is not configured on this gateway")
    created = service.create(
        body.to_request(principal.subject, principal.site_ids), _base_url(request)
    )
    share = created.share
    _audit(
        request,
        AuditAction.SHARE_CREATE,
        share_id=share.share_id,
        study=share.items[0].study_instance_uid,
        detail=share_audit_detail(share),
    )
    notified = None
    if body.notify and smtp is not None and body.recipient_email:
        notified = True
        try:
            send(
                smtp,
                share_message(
                    smtp,
                    str(body.recipient_email),
                    created.url,
                    share.expires_at,
                    has_pin=share.pin_hash is not None,
                    sender_note=share.note,
                ),
            )
        except NotificationError as exc:
            notified = False
            request.state.audit_extra = [
                audit_entry(
                    AuditAction.SHARE_NOTIFY,
                    principal.subject,
                    outcome=8,
                    share_id=share.share_id,
                    detail=str(exc),
                )
            ]
        else:
            request.state.audit_extra = [
                audit_entry(AuditAction.SHARE_NOTIFY, principal.subject, share_id=share.share_id)
            ]
    result = ShareCreated(
        id=share.share_id,
        token=created.token,
        url=created.url,
        expires_at=share.expires_at,
        notified=notified,
    )
    return JSONResponse(
        result.model_dump(mode="json", exclude_none=True),
        status_code=201,
        headers={"Cache-Control": "no-store", "Location": f"/api/shares/{share.share_id}"},
    )


@router.get("/shares", response_model=list[SharePublic], summary="List share links")
def list_shares(
    request: Request,
    principal: SharePrincipal,
    active: bool = False,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=1_000_000),
) -> list[SharePublic]:
    service = _service(request)
    now = service.clock()
    _audit(request, AuditAction.SHARE_LIST)
    return [
        SharePublic.of(s, now)
        for s in service.access.list_shares(
            active_at=now if active else None,
            site_ids=principal.site_ids,
            limit=limit,
            offset=offset,
        )
    ]


def _access_log(service: ShareService, share_id: str) -> list[AccessLogEntry]:
    events = service.access.search_audit(AuditQuery(share_id=share_id, limit=1000))
    return [
        AccessLogEntry(
            time=e.at,
            address=e.address,
            user_agent=e.user_agent,
            resource=e.resource,
            action=e.action,
            outcome="success" if e.outcome == 0 else "failure",
            status_code=e.status_code,
        )
        for e in events
    ]


@router.get(
    "/shares/{share_id}",
    response_model=SharePublic,
    summary="Inspect a share link, with its access log",
)
def get_share(share_id: str, request: Request, principal: SharePrincipal) -> SharePublic:
    service = _service(request)
    share = service.get(share_id, principal.site_ids)
    _audit(request, AuditAction.SHARE_INSPECT, share_id=share.share_id)
    request.app.state.audit_writer.flush()  # the access log includes the latest reads
    return SharePublic.of(share, service.clock(), _access_log(service, share.share_id))


@router.delete("/shares/{share_id}", response_model=SharePublic, summary="Revoke a share link")
def revoke_share(share_id: str, request: Request, principal: SharePrincipal) -> SharePublic:
    service = _service(request)
    share = service.revoke(share_id, principal.site_ids)
    _audit(request, AuditAction.SHARE_REVOKE, share_id=share.share_id)
    return SharePublic.of(share, service.clock())


@router.get("/studies/lookup", include_in_schema=False)
def lookup_studies_moved(_principal: SharePrincipal) -> None:
    """The former lookup took original identifiers in its query string, which access logs
    and the audit trail keep: it is gone, at every API (the trail keeps no query value)."""
    raise NotFound(COMPUTED_AT_THE_SITE)
