"""/api/shares (create, list, inspect with its access log, revoke); the former /api/studies/lookup
answers where lookups went (web_viewer_api.routes.site)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from storage import AuditQuery, ShareRecord
from web_viewer_api.audit import AuditAction, entry
from web_viewer_api.deps import SharePrincipal
from web_viewer_api.errors import BadRequest, NotFound, Unavailable
from web_viewer_api.lookup import COMPUTED_AT_THE_SITE
from web_viewer_api.notify import NotificationError, send, share_message
from web_viewer_api.sealed_context import MAX_SEALED_LENGTH
from web_viewer_api.shares import ShareRequest, ShareService

router = APIRouter(prefix="/api", tags=["Shares"])


class SeriesRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    study_uid: str = Field(max_length=64)
    series_uid: str = Field(max_length=64)


class ShareCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    study_uids: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=list, max_length=100
    )
    #: Share only these series (their studies need not be listed in study_uids).
    series: list[SeriesRef] = Field(default_factory=list, max_length=1000)
    expires_in: int = Field(gt=0, le=10 * 365 * 86400, description="seconds until the link expires")
    #: Its bounds (SharePolicy.min_pin_length to 128 characters) are the share service's:
    #: checked there once, for the API and the CLI alike.
    pin: str | None = Field(None, description="the PIN the recipient types (4 to 128 characters)")
    max_uses: int | None = Field(None, ge=1, le=1_000_000)
    allow_download: bool = False
    recipient: str | None = Field(
        None, max_length=256, description="name or label of the recipient"
    )
    recipient_email: str | None = Field(None, max_length=256, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
    note: str | None = Field(None, max_length=4000)
    sealed_context: str | None = Field(
        None,
        max_length=MAX_SEALED_LENGTH,
        description="the producing site's clinical context (patient name, birth date, real "
        "exam date, clinical question), encrypted at the site: v1.<iv>.<ciphertext>, "
        "AES-256-GCM, base64url; the key goes only in the link's fragment "
        "(#k=<key>), never to this API (see web_viewer_api.sealed_context)",
    )
    #: E-mail the link to recipient_email (never the PIN, never a context key).
    notify: bool = False


class ShareCreated(BaseModel):
    id: str
    token: str
    url: str
    expires_at: dt.datetime
    notified: bool | None = None


class AccessLogEntry(BaseModel):
    time: dt.datetime
    address: str
    user_agent: str
    resource: str
    action: str
    outcome: str
    status_code: int | None


class SharePublic(BaseModel):
    id: str
    study_uids: list[str]
    series: list[SeriesRef]
    created_at: dt.datetime
    created_by: str
    expires_at: dt.datetime
    revoked_at: dt.datetime | None
    status: str
    has_pin: bool
    locked: bool
    pin_failures: int
    max_uses: int | None
    uses: int
    allow_download: bool
    recipient: str
    recipient_email: str
    note: str
    #: The share carries a context sealed at the producing site (unreadable here).
    has_sealed_context: bool = False
    access_log: list[AccessLogEntry] | None = None


def _service(request: Request) -> ShareService:
    service: ShareService | None = request.app.state.share_service
    if service is None:
        raise Unavailable("shares are not configured")
    return service


def _status(share: ShareRecord, now: dt.datetime) -> str:
    if share.revoked_at is not None:
        return "revoked"
    if share.expires_at <= now:
        return "expired"
    if share.locked_at is not None:
        return "locked"
    if share.max_uses is not None and share.uses >= share.max_uses:
        return "used_up"
    return "active"


def public(
    share: ShareRecord, now: dt.datetime, access_log: list[AccessLogEntry] | None = None
) -> SharePublic:
    return SharePublic(
        id=share.share_id,
        study_uids=sorted(
            {i.study_instance_uid for i in share.items if i.series_instance_uid is None}
        ),
        series=[
            SeriesRef(study_uid=i.study_instance_uid, series_uid=i.series_instance_uid)
            for i in share.items
            if i.series_instance_uid is not None
        ],
        created_at=share.created_at,
        created_by=share.created_by,
        expires_at=share.expires_at,
        revoked_at=share.revoked_at,
        status=_status(share, now),
        has_pin=share.pin_hash is not None,
        locked=share.locked_at is not None,
        pin_failures=share.pin_failures,
        max_uses=share.max_uses,
        uses=share.uses,
        allow_download=share.allow_download,
        recipient=share.recipient,
        recipient_email=share.recipient_email,
        note=share.note,
        has_sealed_context=bool(share.sealed_context),
        access_log=access_log,
    )


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
        ShareRequest(
            study_uids=tuple(body.study_uids)
            + tuple(s.study_uid for s in body.series if s.study_uid not in body.study_uids),
            series=tuple(
                (s.study_uid, s.series_uid)
                for s in body.series
                if s.study_uid not in body.study_uids
            ),
            expires_in=dt.timedelta(seconds=body.expires_in),
            created_by=principal.subject,
            pin=body.pin,
            max_uses=body.max_uses,
            allow_download=body.allow_download,
            recipient=body.recipient or "",
            recipient_email=str(body.recipient_email or ""),
            note=body.note or "",
            site_ids=principal.site_ids,
            sealed_context=body.sealed_context or "",
        ),
        _base_url(request),
    )
    share = created.share
    _audit(
        request,
        AuditAction.SHARE_CREATE,
        share_id=share.share_id,
        study=share.items[0].study_instance_uid,
        detail={
            "studies": sorted({i.study_instance_uid for i in share.items}),
            "expires_at": share.expires_at.isoformat(),
            "pin": share.pin_hash is not None,
            "max_uses": share.max_uses,
            "allow_download": share.allow_download,
            "sealed_context": bool(share.sealed_context),
        },
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
                entry(
                    AuditAction.SHARE_NOTIFY,
                    principal.subject,
                    outcome=8,
                    share_id=share.share_id,
                    detail=str(exc),
                )
            ]
        else:
            request.state.audit_extra = [
                entry(AuditAction.SHARE_NOTIFY, principal.subject, share_id=share.share_id)
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
        public(s, now)
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
    return public(share, service.clock(), _access_log(service, share.share_id))


@router.delete("/shares/{share_id}", response_model=SharePublic, summary="Revoke a share link")
def revoke_share(share_id: str, request: Request, principal: SharePrincipal) -> SharePublic:
    service = _service(request)
    share = service.revoke(share_id, principal.site_ids)
    _audit(request, AuditAction.SHARE_REVOKE, share_id=share.share_id)
    return public(share, service.clock())


@router.get("/studies/lookup", include_in_schema=False)
def lookup_studies_moved(_principal: SharePrincipal) -> None:
    """The former lookup took original identifiers in its query string, which access logs
    and the audit trail keep: it is gone, at every API (the trail keeps no query value)."""
    raise NotFound(COMPUTED_AT_THE_SITE)
