"""Share links: create (token shown once), inspect, revoke, and open a viewer session
(PIN check, use counting). Used by the HTTP API and by `dicom-gateway share`."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from access.errors import (
    InvalidShareRequest,
    PinCheckBusy,
    ShareEnded,
    ShareLocked,
    ShareNotFound,
    WrongPin,
)
from access.permissions import Permission
from access.sealed_context import check_sealed
from access.tokens import hash_pin, new_token, sha256_hex, verify_pin
from imaging import is_uid_shaped
from storage import (
    AccessRepository,
    AccessScope,
    IndexRepository,
    InstanceQuery,
    QueryRetrieve,
    ShareItemRecord,
    ShareRecord,
    StudyQuery,
)

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class SharePolicy:
    max_expiry: dt.timedelta = dt.timedelta(days=30)
    session_lifetime: dt.timedelta = dt.timedelta(minutes=30)
    #: Wrong PINs before the share locks for good.
    pin_lock_after: int = 5
    min_pin_length: int = 4


@dataclass(frozen=True)
class ShareRequest:
    study_uids: tuple[str, ...]
    expires_in: dt.timedelta
    created_by: str
    #: (study UID, series UID) pairs: share only these series of those studies.
    series: tuple[tuple[str, str], ...] = ()
    pin: str | None = None
    max_uses: int | None = None
    #: What it allows beyond viewing.
    permissions: frozenset[Permission] = frozenset()
    recipient: str = ""
    recipient_email: str = ""
    note: str = ""
    #: The creator sees only these sites' studies (site-restricted key): so does the share.
    site_ids: frozenset[str] | None = None
    #: The producing site's context, sealed at the site (`access.sealed_context`).
    sealed_context: str = ""


@dataclass(frozen=True)
class CreatedShare:
    share: ShareRecord
    #: Shown once, never stored.
    token: str
    url: str


class ShareService:
    def __init__(
        self,
        access: AccessRepository,
        index: IndexRepository,
        policy: SharePolicy,
        clock: Clock = utc_now,
    ) -> None:
        self.access, self.index, self.policy = access, index, policy
        self.clock = clock

    def create(self, request: ShareRequest, base_url: str) -> CreatedShare:
        studies = tuple(dict.fromkeys(request.study_uids))
        if not studies or len(studies) > 100:
            raise InvalidShareRequest("study_uids: one to 100 study instance UIDs")
        for uid in studies + tuple(s for pair in request.series for s in pair):
            if not is_uid_shaped(uid):
                raise InvalidShareRequest(f"not a UID: {uid[:70]!r}")
        if request.expires_in <= dt.timedelta(0):
            raise InvalidShareRequest("expires_in must be positive")
        if request.expires_in > self.policy.max_expiry:
            raise InvalidShareRequest(
                f"expires_in is longer than the maximum of "
                f"{int(self.policy.max_expiry.total_seconds())} s"
            )
        if request.pin is not None and (
            len(request.pin) < self.policy.min_pin_length or len(request.pin) > 128
        ):
            raise InvalidShareRequest(f"pin: {self.policy.min_pin_length} to 128 characters")
        if request.max_uses is not None and request.max_uses < 1:
            raise InvalidShareRequest("max_uses must be at least 1")
        if request.sealed_context:
            try:
                check_sealed(request.sealed_context)
            except ValueError as exc:
                raise InvalidShareRequest(str(exc)) from None
        scope = AccessScope(site_ids=request.site_ids)
        found = {
            s.study_instance_uid
            for s in QueryRetrieve(self.index).search_for_studies(
                scope, StudyQuery(study_instance_uids=studies, limit=len(studies))
            )
        }
        missing = [uid for uid in studies if uid not in found]
        if missing:
            raise ShareNotFound(f"no such study: {missing[0]}")
        items = [
            ShareItemRecord(uid)
            for uid in studies
            if not any(study == uid for study, _ in request.series)
        ]
        for study, series in dict.fromkeys(request.series):
            if study not in found or not self.index.search_instances(
                InstanceQuery(study_instance_uid=study, series_instance_uid=series, limit=1)
            ):
                raise ShareNotFound(f"no such series in the shared studies: {series}")
            items.append(ShareItemRecord(study, series))
        now = self.clock()
        token = new_token()
        share = ShareRecord(
            share_id=secrets.token_hex(8),
            created_at=now,
            created_by=request.created_by,
            expires_at=now + request.expires_in,
            revoked_at=None,
            pin_hash=hash_pin(request.pin) if request.pin else None,
            pin_failures=0,
            locked_at=None,
            max_uses=request.max_uses,
            uses=0,
            permissions=frozenset(request.permissions),
            recipient=request.recipient[:256],
            recipient_email=request.recipient_email[:256],
            note=request.note[:4000],
            site_ids=request.site_ids,
            items=tuple(items),
            sealed_context=request.sealed_context,
        )
        self.access.add_share(share, sha256_hex(token))
        return CreatedShare(share, token, f"{base_url.rstrip('/')}/s/{token}")

    def get(self, share_id: str, site_ids: frozenset[str] | None = None) -> ShareRecord:
        """The share; for a caller limited to `site_ids`, only one whose every study comes
        from those sites (any other answers as if it did not exist)."""
        share = self.access.share(share_id, site_ids)
        if share is None:
            raise ShareNotFound("no such share")
        return share

    def revoke(self, share_id: str, site_ids: frozenset[str] | None = None) -> ShareRecord:
        self.get(share_id, site_ids)
        self.access.revoke_share(share_id, self.clock())
        return self.get(share_id)

    def open_session(
        self, share: ShareRecord, pin: str | None, previous: str | None = None
    ) -> tuple[str, dt.datetime]:
        """Check the PIN (when the share has one), count one use, and return a new viewer
        session id (for the cookie) with its expiry. A browser whose session of this share
        ended (`previous`: its cookie) reopens it after the PIN without counting a use.

        Wrong PINs count against the share, whoever sent them, over its whole life (a right
        PIN does not reset the count): the share locks for good at `pin_lock_after`. They
        do not count against the address: one recipient's typos behind a hospital's NAT
        lock no other share."""
        now = self.clock()
        check_usable(share, now)
        if share.pin_hash is not None:
            lock_after = self.policy.pin_lock_after
            # Counted before the (slow) check: racing requests cannot check more PINs than
            # the lock allows.
            if not self.access.reserve_pin_attempt(share.share_id, lock_after):
                check_usable(self.get(share.share_id), now)  # raises: locked
                raise PinCheckBusy(
                    "other PIN attempts on this share are being checked; try again", retry_after=1
                )
            if not pin or not verify_pin(pin, share.pin_hash):
                failures = self.access.pin_attempt_failed(share.share_id, lock_after, now)
                left = lock_after - failures
                if left <= 0:
                    check_usable(self.get(share.share_id), now)  # raises: locked
                raise WrongPin(f"wrong PIN ({max(left, 1)} attempt{'s' if left > 1 else ''} left)")
            self.access.pin_attempt_succeeded(share.share_id)
        session = new_token()
        expires = min(now + self.policy.session_lifetime, share.expires_at)
        if not self.access.open_session(
            share.share_id,
            sha256_hex(session),
            now,
            expires,
            sha256_hex(previous) if previous else None,
        ):
            current = self.get(share.share_id)
            check_usable(current, now)
            raise ShareEnded("this share link has been used the maximum number of times")
        return session, expires


def share_scope(share: ShareRecord) -> AccessScope:
    """The studies, and series of studies, a share opens."""
    studies = frozenset(item.study_instance_uid for item in share.items)
    whole = {i.study_instance_uid for i in share.items if i.series_instance_uid is None}
    limits: dict[str, set[str]] = {}
    for item in share.items:
        if item.series_instance_uid is not None and item.study_instance_uid not in whole:
            limits.setdefault(item.study_instance_uid, set()).add(item.series_instance_uid)
    return AccessScope(
        site_ids=None,
        study_instance_uids=studies,
        series_limits={k: frozenset(v) for k, v in limits.items()},
    )


def needs_session(share: ShareRecord) -> bool:
    """A PIN or a use limit: only a counted, PIN-checked viewer session reads the studies."""
    return share.pin_hash is not None or share.max_uses is not None


def check_usable(share: ShareRecord, now: dt.datetime) -> None:
    """Raises ShareEnded (revoked, expired) or ShareLocked (too many wrong PINs)."""
    if share.revoked_at is not None:
        raise ShareEnded("this share link was revoked")
    if share.expires_at <= now:
        raise ShareEnded("this share link has expired")
    if share.locked_at is not None:
        raise ShareLocked(
            "this share link is locked after too many wrong PINs; ask the sender for a new one"
        )


def share_status(share: ShareRecord, now: dt.datetime) -> str:
    """active, revoked, expired, locked or used_up (the first that applies, in this order)."""
    if share.revoked_at is not None:
        return "revoked"
    if share.expires_at <= now:
        return "expired"
    if share.locked_at is not None:
        return "locked"
    if share.max_uses is not None and share.uses >= share.max_uses:
        return "used_up"
    return "active"


__all__ = [
    "Clock",
    "CreatedShare",
    "SharePolicy",
    "ShareRequest",
    "ShareService",
    "check_usable",
    "needs_session",
    "share_scope",
    "share_status",
    "utc_now",
]
