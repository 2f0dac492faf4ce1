"""The one schema pair of a share: what a creator asks (`ShareCreate`) and what is shown of a
share (`SharePublic`), for the API (request and response bodies) and the CLI alike."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from access.permissions import Permission, described
from access.sealed_context import MAX_SEALED_LENGTH
from access.shares import ShareRequest, share_status
from storage import ShareRecord

_KNOWN = frozenset(p.value for p in Permission)


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
    #: checked there once.
    pin: str | None = Field(None, description="the PIN the recipient types (4 to 128 characters)")
    max_uses: int | None = Field(None, ge=1, le=1_000_000)
    permissions: list[Permission] = Field(
        default_factory=list,
        max_length=len(Permission),
        description=f"what the share allows beyond viewing: {described()}",
    )
    #: The same as "download" in permissions (kept for the clients written before them).
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
        "(#k=<key>), never to this API (see access.sealed_context)",
    )
    #: E-mail the link to recipient_email (never the PIN, never a context key).
    notify: bool = False

    def granted(self) -> frozenset[Permission]:
        return frozenset(self.permissions) | (
            {Permission.DOWNLOAD} if self.allow_download else frozenset()
        )

    def to_request(self, created_by: str, site_ids: frozenset[str] | None) -> ShareRequest:
        """The share service's request: series of a study listed whole are the study."""
        whole = set(self.study_uids)
        return ShareRequest(
            study_uids=tuple(self.study_uids)
            + tuple(s.study_uid for s in self.series if s.study_uid not in whole),
            series=tuple(
                (s.study_uid, s.series_uid) for s in self.series if s.study_uid not in whole
            ),
            expires_in=dt.timedelta(seconds=self.expires_in),
            created_by=created_by,
            pin=self.pin,
            max_uses=self.max_uses,
            permissions=self.granted(),
            recipient=self.recipient or "",
            recipient_email=self.recipient_email or "",
            note=self.note or "",
            site_ids=site_ids,
            sealed_context=self.sealed_context or "",
        )


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
    permissions: list[Permission]
    #: "download" in permissions (kept for the clients written before them).
    allow_download: bool
    recipient: str
    recipient_email: str
    note: str
    #: The share carries a context sealed at the producing site (unreadable here).
    has_sealed_context: bool = False
    access_log: list[AccessLogEntry] | None = None

    @classmethod
    def of(
        cls,
        share: ShareRecord,
        now: dt.datetime,
        access_log: list[AccessLogEntry] | None = None,
    ) -> SharePublic:
        return cls(
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
            status=share_status(share, now),
            has_pin=share.pin_hash is not None,
            locked=share.locked_at is not None,
            pin_failures=share.pin_failures,
            max_uses=share.max_uses,
            uses=share.uses,
            # A name this version does not know (written by a newer one) is not shown.
            permissions=[Permission(p) for p in sorted(share.permissions) if p in _KNOWN],
            allow_download=Permission.DOWNLOAD in share.permissions,
            recipient=share.recipient,
            recipient_email=share.recipient_email,
            note=share.note,
            has_sealed_context=bool(share.sealed_context),
            access_log=access_log,
        )


def share_audit_detail(share: ShareRecord) -> dict[str, Any]:
    """What the audit trail keeps of a new share (no PIN, no token, no context)."""
    return {
        "studies": sorted({i.study_instance_uid for i in share.items}),
        "expires_at": share.expires_at.isoformat(),
        "pin": share.pin_hash is not None,
        "max_uses": share.max_uses,
        "permissions": sorted(share.permissions),
        "sealed_context": bool(share.sealed_context),
    }


__all__ = [
    "AccessLogEntry",
    "SeriesRef",
    "ShareCreate",
    "ShareCreated",
    "SharePublic",
    "share_audit_detail",
]
