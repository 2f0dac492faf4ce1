"""Access control and audit rows: API keys, share links (scope, sessions, use counts) and the
append-only audit trail. Only hashes of secrets are stored; hashing and policy live with the
caller (web_viewer_api), this module only keeps rows consistent under concurrency."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, and_, delete, exists, func, insert, or_, select, update

from storage.index.models import ApiKey, AuditEvent, Share, ShareItem, ShareSession, Study


def _utc(moment: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive datetimes for timezone-aware columns: they are UTC."""
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _of_sites(site_ids: frozenset[str]) -> Any:
    """A share with at least one item, every item of which is a study indexed as produced
    by one of `site_ids`. Fails closed: a study not (or no longer) indexed — during a
    reindex, say — hides the share from site-limited callers."""
    in_sites = exists().where(
        Study.study_instance_uid == ShareItem.study_instance_uid,
        Study.site_id.in_(sorted(site_ids)),
    )
    return and_(
        exists().where(ShareItem.share_id == Share.share_id),
        ~exists().where(ShareItem.share_id == Share.share_id, ~in_sites),
    )


def _audit_of_sites(site_ids: frozenset[str], caller: str | None) -> Any:
    """The audit events a caller limited to `site_ids` may read: those about its sites'
    data — every study the event names is indexed as one of these sites' and every share
    it names is of these sites' studies (`_of_sites`), and it names at least one — and the
    caller's own events. Fails closed: an event naming neither (an unknown address's failed
    token, another key's request), or a study not (or no longer) indexed, is not shown."""
    sites = sorted(site_ids)
    study_of_sites = exists().where(
        Study.study_instance_uid == AuditEvent.study_instance_uid, Study.site_id.in_(sites)
    )
    share_of_sites = exists().where(Share.share_id == AuditEvent.share_id, _of_sites(site_ids))
    about_sites = and_(
        or_(AuditEvent.study_instance_uid != "", AuditEvent.share_id != ""),
        or_(AuditEvent.study_instance_uid == "", study_of_sites),
        or_(AuditEvent.share_id == "", share_of_sites),
    )
    return or_(about_sites, AuditEvent.actor == caller) if caller else about_sites


#: Audit columns filled from what a client sent (addresses, names, paths) and their sizes.
_AUDIT_TEXT = {
    "actor": 300,
    "address": 64,
    "user_agent": 512,
    "resource": 1024,
    "study_instance_uid": 64,
    "share_id": 32,
}


def _audit_row(event: AuditEntry) -> dict[str, Any]:
    """An audit event as a row: text from clients bounded to its column (PostgreSQL refuses
    a longer value, and with it the whole batch) and without control characters (an OIDC
    subject with a newline must not forge a line of an export or a log)."""
    row = {k: v for k, v in event.__dict__.items() if k != "event_id"}
    for name, size in _AUDIT_TEXT.items():
        value = str(row[name])[:size]
        row[name] = (
            value if value.isprintable() else "".join(c if c.isprintable() else "?" for c in value)
        )
    return row


def _joined(site_ids: frozenset[str] | None) -> str | None:
    return " ".join(sorted(site_ids)) if site_ids is not None else None


def _split(sites: str | None) -> frozenset[str] | None:
    return frozenset(sites.split()) if sites is not None else None


@dataclass(frozen=True)
class ApiKeyRecord:
    key_id: str
    name: str
    scopes: frozenset[str]
    #: None: every site's studies.
    site_ids: frozenset[str] | None
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    secret_sha256: str = field(repr=False, default="")


@dataclass(frozen=True)
class ShareItemRecord:
    study_instance_uid: str
    #: None: the whole study.
    series_instance_uid: str | None = None


#: How long after its end a viewer session may be reopened by the same browser without
#: counting a use (the recipient re-enters the PIN; the share's own expiry still applies).
SESSION_REOPEN_GRACE = dt.timedelta(days=1)


@dataclass(frozen=True)
class ShareRecord:
    share_id: str
    created_at: dt.datetime
    created_by: str
    expires_at: dt.datetime
    revoked_at: dt.datetime | None
    pin_hash: str | None = field(repr=False)
    pin_failures: int
    locked_at: dt.datetime | None
    max_uses: int | None
    uses: int
    #: What the share allows beyond viewing (`access.Permission` names, e.g. "download").
    permissions: frozenset[str]
    recipient: str
    recipient_email: str
    note: str
    #: The sites its creator was limited to; None: not limited.
    site_ids: frozenset[str] | None
    items: tuple[ShareItemRecord, ...]
    #: The producing site's context, sealed at the site (opaque here: see the model).
    sealed_context: str = ""


@dataclass(frozen=True)
class AuditEntry:
    """One audit event (PS3.15 A.5 vocabulary: EventID code, EventActionCode, outcome)."""

    at: dt.datetime
    action: str
    event_code: str
    event_action: str
    outcome: int
    actor: str
    address: str = ""
    user_agent: str = ""
    resource: str = ""
    study_instance_uid: str = ""
    share_id: str = ""
    status_code: int | None = None
    detail: str = ""
    event_id: int | None = None


@dataclass(frozen=True)
class AuditQuery:
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    actions: tuple[str, ...] = ()
    actor: str | None = None
    share_id: str | None = None
    study_instance_uid: str | None = None
    address: str | None = None
    failures_only: bool = False
    #: Only events after this id (keyset paging for exports).
    after_id: int | None = None
    #: A caller limited to these sites sees only their events (`_audit_of_sites`) and,
    #: when `caller` is given, its own; None: every event.
    site_ids: frozenset[str] | None = None
    caller: str | None = None
    limit: int = 100
    offset: int = 0
    newest_first: bool = True


class AccessRepository:
    """API keys, shares and audit events in the index database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # API keys ----------------------------------------------------------------------------
    def add_api_key(self, record: ApiKeyRecord) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                insert(ApiKey).values(
                    key_id=record.key_id,
                    secret_sha256=record.secret_sha256,
                    name=record.name,
                    scopes=" ".join(sorted(record.scopes)),
                    sites=_joined(record.site_ids),
                    created_at=record.created_at,
                )
            )

    @staticmethod
    def _key(row: Any) -> ApiKeyRecord:
        return ApiKeyRecord(
            row.key_id,
            row.name,
            frozenset(row.scopes.split()),
            _split(row.sites),
            _utc(row.created_at) or row.created_at,
            _utc(row.revoked_at),
            row.secret_sha256,
        )

    def api_key(self, key_id: str) -> ApiKeyRecord | None:
        with self.engine.connect() as connection:
            row = connection.execute(
                select(ApiKey.__table__).where(ApiKey.key_id == key_id)
            ).first()
        return self._key(row) if row else None

    def list_api_keys(self) -> list[ApiKeyRecord]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(ApiKey.__table__).order_by(ApiKey.created_at)).all()
        return [self._key(r) for r in rows]

    def revoke_api_key(self, key_id: str, now: dt.datetime) -> bool:
        with self.engine.begin() as connection:
            result = connection.execute(
                update(ApiKey)
                .where(ApiKey.key_id == key_id, ApiKey.revoked_at.is_(None))
                .values(revoked_at=now)
            )
        return bool(result.rowcount)

    # Shares ------------------------------------------------------------------------------
    def add_share(self, share: ShareRecord, token_sha256: str) -> None:
        values = {
            k: v for k, v in share.__dict__.items() if k not in ("items", "site_ids", "permissions")
        }
        values["sites"] = _joined(share.site_ids)
        values["permissions"] = " ".join(sorted(share.permissions))
        with self.engine.begin() as connection:
            connection.execute(insert(Share).values(token_sha256=token_sha256, **values))
            connection.execute(
                insert(ShareItem),
                [
                    {
                        "share_id": share.share_id,
                        "study_instance_uid": item.study_instance_uid,
                        "series_instance_uid": item.series_instance_uid or "",
                    }
                    for item in share.items
                ],
            )

    def _shares(self, where: Any, limit: int | None = None, offset: int = 0) -> list[ShareRecord]:
        statement = (
            select(Share.__table__).where(where).order_by(Share.created_at.desc(), Share.share_id)
        )
        if limit is not None:
            statement = statement.limit(limit).offset(offset)
        with self.engine.connect() as connection:
            rows = connection.execute(statement).all()
            items: dict[str, list[ShareItemRecord]] = {}
            if rows:
                for item in connection.execute(
                    select(ShareItem.__table__)
                    .where(ShareItem.share_id.in_([r.share_id for r in rows]))
                    .order_by(ShareItem.study_instance_uid, ShareItem.series_instance_uid)
                ):
                    items.setdefault(item.share_id, []).append(
                        ShareItemRecord(item.study_instance_uid, item.series_instance_uid or None)
                    )
        return [
            ShareRecord(
                share_id=r.share_id,
                created_at=_utc(r.created_at) or r.created_at,
                created_by=r.created_by,
                expires_at=_utc(r.expires_at) or r.expires_at,
                revoked_at=_utc(r.revoked_at),
                pin_hash=r.pin_hash,
                pin_failures=r.pin_failures,
                locked_at=_utc(r.locked_at),
                max_uses=r.max_uses,
                uses=r.uses,
                permissions=frozenset((r.permissions or "").split()),
                recipient=r.recipient,
                recipient_email=r.recipient_email,
                note=r.note,
                site_ids=_split(r.sites),
                items=tuple(items.get(r.share_id, ())),
                sealed_context=r.sealed_context or "",
            )
            for r in rows
        ]

    def share(self, share_id: str, site_ids: frozenset[str] | None = None) -> ShareRecord | None:
        """The share; with `site_ids`, only if it is of these sites' studies (`of_sites`)."""
        condition = Share.share_id == share_id
        found = self._shares(
            condition if site_ids is None else and_(condition, _of_sites(site_ids))
        )
        return found[0] if found else None

    def share_by_token(self, token_sha256: str) -> ShareRecord | None:
        found = self._shares(Share.token_sha256 == token_sha256)
        return found[0] if found else None

    def list_shares(
        self,
        *,
        active_at: dt.datetime | None = None,
        site_ids: frozenset[str] | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[ShareRecord]:
        """Shares newest first; `active_at`: only those neither revoked nor expired then;
        `site_ids`: only those of these sites' studies (`of_sites`)."""
        conditions: list[Any] = []
        if active_at is not None:
            conditions += [Share.revoked_at.is_(None), Share.expires_at > active_at]
        if site_ids is not None:
            conditions.append(_of_sites(site_ids))
        return self._shares(and_(True, *conditions), limit, offset)

    def revoke_share(self, share_id: str, now: dt.datetime) -> bool:
        with self.engine.begin() as connection:
            result = connection.execute(
                update(Share)
                .where(Share.share_id == share_id, Share.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            connection.execute(delete(ShareSession).where(ShareSession.share_id == share_id))
        return bool(result.rowcount)

    def reserve_pin_attempt(self, share_id: str, lock_after: int) -> bool:
        """Count one PIN attempt as a failure before its PIN is checked, unless the share is
        locked or `lock_after` attempts are already counted: at most `lock_after` PINs are
        ever checked, however many requests race (a right PIN gives its count back)."""
        with self.engine.begin() as connection:
            counted = connection.execute(
                update(Share)
                .where(
                    Share.share_id == share_id,
                    Share.locked_at.is_(None),
                    Share.pin_failures < lock_after,
                )
                .values(pin_failures=Share.pin_failures + 1)
            )
        return bool(counted.rowcount)

    def pin_attempt_failed(self, share_id: str, lock_after: int, now: dt.datetime) -> int:
        """A reserved attempt was a wrong PIN: it stays counted (for the share's whole life;
        a right PIN later does not reset it); the share locks at `lock_after`. The count."""
        with self.engine.begin() as connection:
            connection.execute(
                update(Share)
                .where(
                    Share.share_id == share_id,
                    Share.pin_failures >= lock_after,
                    Share.locked_at.is_(None),
                )
                .values(locked_at=now)
            )
            return int(
                connection.execute(
                    select(Share.pin_failures).where(Share.share_id == share_id)
                ).scalar_one()
            )

    def pin_attempt_succeeded(self, share_id: str) -> None:
        """A reserved attempt was the right PIN: its count is given back."""
        with self.engine.begin() as connection:
            connection.execute(
                update(Share)
                .where(Share.share_id == share_id, Share.pin_failures > 0)
                .values(pin_failures=Share.pin_failures - 1)
            )

    def open_session(
        self,
        share_id: str,
        session_sha256: str,
        now: dt.datetime,
        expires_at: dt.datetime,
        previous_sha256: str | None = None,
    ) -> bool:
        """Count one use and open a session, unless the share is used up, revoked, expired
        or locked (checked and counted in one statement: concurrent openings cannot
        exceed max_uses). A browser that held a session of this share (`previous_sha256`,
        live or ended within `SESSION_REOPEN_GRACE`) reopens it: no use is counted."""
        with self.engine.begin() as connection:
            if previous_sha256 is not None:
                reopened = connection.execute(
                    delete(ShareSession).where(
                        ShareSession.session_sha256 == previous_sha256,
                        ShareSession.share_id == share_id,
                        ShareSession.expires_at > now - SESSION_REOPEN_GRACE,
                    )
                )
                if (
                    reopened.rowcount
                    and connection.execute(
                        select(Share.share_id).where(
                            Share.share_id == share_id,
                            Share.revoked_at.is_(None),
                            Share.locked_at.is_(None),
                            Share.expires_at > now,
                        )
                    ).first()
                ):
                    connection.execute(
                        insert(ShareSession).values(
                            session_sha256=session_sha256,
                            share_id=share_id,
                            created_at=now,
                            expires_at=expires_at,
                        )
                    )
                    return True
            counted = connection.execute(
                update(Share)
                .where(
                    Share.share_id == share_id,
                    Share.revoked_at.is_(None),
                    Share.locked_at.is_(None),
                    Share.expires_at > now,
                    or_(Share.max_uses.is_(None), Share.uses < Share.max_uses),
                )
                .values(uses=Share.uses + 1)
            )
            if not counted.rowcount:
                return False
            connection.execute(
                insert(ShareSession).values(
                    session_sha256=session_sha256,
                    share_id=share_id,
                    created_at=now,
                    expires_at=expires_at,
                )
            )
            connection.execute(
                delete(ShareSession).where(ShareSession.expires_at < now - SESSION_REOPEN_GRACE)
            )
        return True

    def session_share(
        self, session_sha256: str, now: dt.datetime
    ) -> tuple[str, dt.datetime] | None:
        """The share id and expiry of a live session, or None."""
        with self.engine.connect() as connection:
            row = connection.execute(
                select(ShareSession.share_id, ShareSession.expires_at).where(
                    ShareSession.session_sha256 == session_sha256, ShareSession.expires_at > now
                )
            ).first()
        return None if row is None else (row.share_id, _utc(row.expires_at) or row.expires_at)

    def may_reopen(self, session_sha256: str, share_id: str, now: dt.datetime) -> bool:
        """This browser held a session of this share, live or ended within the grace."""
        with self.engine.connect() as connection:
            return (
                connection.execute(
                    select(ShareSession.share_id).where(
                        ShareSession.session_sha256 == session_sha256,
                        ShareSession.share_id == share_id,
                        ShareSession.expires_at > now - SESSION_REOPEN_GRACE,
                    )
                ).first()
                is not None
            )

    def renew_session(self, session_sha256: str, expires_at: dt.datetime) -> None:
        """Move a live session's expiry to `expires_at` (activity renews it)."""
        with self.engine.begin() as connection:
            connection.execute(
                update(ShareSession)
                .where(
                    ShareSession.session_sha256 == session_sha256,
                    ShareSession.expires_at < expires_at,
                )
                .values(expires_at=expires_at)
            )

    # Audit -------------------------------------------------------------------------------
    def append_audit(self, entries: Sequence[AuditEntry]) -> None:
        if not entries:
            return
        rows = [_audit_row(e) for e in entries]
        with self.engine.begin() as connection:
            connection.execute(insert(AuditEvent), rows)

    def search_audit(self, query: AuditQuery) -> list[AuditEntry]:
        conditions: list[Any] = []
        if query.since is not None:
            conditions.append(AuditEvent.at >= query.since)
        if query.until is not None:
            conditions.append(AuditEvent.at < query.until)
        if query.actions:
            conditions.append(AuditEvent.action.in_(query.actions))
        for column, value in (
            (AuditEvent.actor, query.actor),
            (AuditEvent.share_id, query.share_id),
            (AuditEvent.study_instance_uid, query.study_instance_uid),
            (AuditEvent.address, query.address),
        ):
            if value is not None:
                conditions.append(column == value)
        if query.failures_only:
            conditions.append(AuditEvent.outcome != 0)
        if query.after_id is not None:
            conditions.append(AuditEvent.event_id > query.after_id)
        if query.site_ids is not None:
            conditions.append(_audit_of_sites(query.site_ids, query.caller))
        order = AuditEvent.event_id.desc() if query.newest_first else AuditEvent.event_id
        statement = (
            select(AuditEvent.__table__)
            .where(*conditions)
            .order_by(order)
            .limit(query.limit)
            .offset(query.offset)
        )
        with self.engine.connect() as connection:
            rows = connection.execute(statement).all()
        return [AuditEntry(**{**r._mapping, "at": _utc(r.at)}) for r in rows]

    def count_recent_audit(
        self,
        *,
        actions: tuple[str, ...],
        since: dt.datetime,
        address: str | None = None,
        share_id: str | None = None,
        actor: str | None = None,
    ) -> int:
        """How many of these events happened since `since` (rate limiting reads this), by
        address, share or actor (the key of what failed)."""
        conditions: list[Any] = [AuditEvent.action.in_(actions), AuditEvent.at >= since]
        if address is not None:
            conditions.append(AuditEvent.address == address)
        if actor is not None:
            conditions.append(AuditEvent.actor == actor)
        if share_id is not None:
            conditions.append(AuditEvent.share_id == share_id)
        with self.engine.connect() as connection:
            return int(
                connection.execute(
                    select(func.count()).select_from(AuditEvent).where(*conditions)
                ).scalar_one()
            )


__all__ = [
    "AccessRepository",
    "ApiKeyRecord",
    "AuditEntry",
    "AuditQuery",
    "ShareItemRecord",
    "ShareRecord",
]
