"""Who is calling: the admin token, API keys, OIDC bearer tokens, share links; and the
limits on failed attempts (per client address) that make guessing pointless."""

from __future__ import annotations

import datetime as dt
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from threading import Lock

from storage import AccessRepository, AccessScope, ApiKeyRecord, ShareRecord
from web_viewer_api.errors import ApiError, Forbidden, Gone, NotFound, RateLimited, Unauthorized
from web_viewer_api.oidc import OidcVerifier
from web_viewer_api.security import same_secret, sha256_hex, split_api_key

ALL_SCOPES = frozenset({"read", "write", "share", "admin"})
Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class ShareAccess:
    """What a share link opens."""

    share_id: str
    allow_download: bool
    scope: AccessScope


@dataclass(frozen=True)
class Principal:
    """Who is calling and what they may do; `subject` is the audit trail's actor."""

    subject: str
    scopes: frozenset[str]
    #: None: every site's studies.
    site_ids: frozenset[str] | None = None
    share: ShareAccess | None = None

    @property
    def scope(self) -> AccessScope | None:
        """The studies this caller may see (None: all)."""
        if self.share is not None:
            return self.share.scope
        if self.site_ids is not None:
            return AccessScope(site_ids=self.site_ids)
        return None


def share_scope(share: ShareRecord) -> AccessScope:
    studies = frozenset(item.study_instance_uid for item in share.items)
    whole = {i.study_instance_uid for i in share.items if i.series_instance_uid is None}
    limits: dict[str, set[str]] = {}
    for item in share.items:
        if item.series_instance_uid is not None and item.study_instance_uid not in whole:
            limits.setdefault(item.study_instance_uid, set()).add(item.series_instance_uid)
    return AccessScope(site_ids=None, study_instance_uids=studies,
                       series_limits={k: frozenset(v) for k, v in limits.items()})


@dataclass
class FailureLimiter:
    """Refuses an address (429) once it has failed `limit` times within `window_seconds`.

    Failures are remembered in this process and, for several API processes, counted in the
    audit trail they all write; a blocked address stays blocked for one window.
    """

    limit: int
    window_seconds: float
    count_recorded: Callable[[str, dt.datetime], int] | None = None
    clock: Callable[[], float] = time.monotonic
    _recent: dict[str, deque[float]] = field(default_factory=dict)
    _blocked_until: dict[str, float] = field(default_factory=dict)
    _lock: Lock = field(default_factory=Lock)

    def check(self, address: str) -> None:
        with self._lock:
            until = self._blocked_until.get(address)
            if until is not None and until > self.clock():
                raise RateLimited("too many failed attempts from this address; try later",
                                  retry_after=max(1, int(until - self.clock())))

    def failed(self, address: str) -> None:
        """Count one failure; block the address when it reaches the limit."""
        now = self.clock()
        with self._lock:
            recent = self._recent.setdefault(address, deque())
            recent.append(now)
            while recent and recent[0] < now - self.window_seconds:
                recent.popleft()
            count = len(recent)
            if len(self._recent) > 100_000:  # bounded memory under a spray of addresses
                self._recent = {a: d for a, d in self._recent.items() if d and d[-1] >= now - self.window_seconds}
        if self.count_recorded is not None and count < self.limit:
            since = utc_now() - dt.timedelta(seconds=self.window_seconds)
            count = max(count, self.count_recorded(address, since) + 1)
        if count >= self.limit:
            with self._lock:
                self._blocked_until[address] = now + self.window_seconds


@dataclass
class Authenticator:
    """Resolves credentials to a Principal. Every comparison of secrets is constant-time."""

    admin_token: str
    access: AccessRepository | None
    oidc: OidcVerifier | None
    limiter: FailureLimiter
    clock: Clock = utc_now

    def admin(self, token: str) -> Principal | None:
        if same_secret(token, self.admin_token):
            return Principal("admin", ALL_SCOPES)
        return None

    def authenticate(self, token: str, address: str) -> Principal:
        """API key or OIDC token (may touch the database or the issuer: call in a thread)."""
        self.limiter.check(address)
        try:
            return self._resolve(token)
        except Unauthorized:
            self.limiter.failed(address)
            raise

    @staticmethod
    def key_principal(token: str, key_id: str, record: ApiKeyRecord | None) -> Principal | None:
        """The principal of API key `token` (id `key_id`, its stored `record`), or None when
        the key is unknown, revoked or its secret differs."""
        # Hash even when the key is unknown: the answer takes as long either way.
        presented = sha256_hex(token)
        if (record is not None and record.revoked_at is None
                and same_secret(presented, record.secret_sha256)):
            return Principal(f"key:{key_id}", record.scopes, record.site_ids)
        return None

    def _resolve(self, token: str) -> Principal:
        key_id = split_api_key(token)
        if key_id is not None and self.access is not None:
            principal = self.key_principal(token, key_id, self.access.api_key(key_id))
            if principal is None:
                raise Unauthorized("invalid or revoked API key", presented=True)
            return principal
        if self.oidc is not None and token.count(".") == 2:
            identity = self.oidc.verify(token)
            return Principal(f"oidc:{identity.subject}", identity.scopes, identity.site_ids)
        raise Unauthorized("invalid bearer token", presented=True)


@dataclass
class ShareGate:
    """Opens a share link: unknown token 404, expired/revoked/used up 410, locked 403,
    a PIN or a use limit needs a viewer session (cookie) first."""

    access: AccessRepository
    limiter: FailureLimiter
    clock: Clock = utc_now

    def find(self, share_token: str, address: str) -> ShareRecord:
        """The live share behind a token; counts unknown tokens against the address."""
        self.limiter.check(address)
        share = self.access.share_by_token(sha256_hex(share_token))
        if share is None:
            self.limiter.failed(address)
            raise NotFound("not found")
        check_usable(share, self.clock())
        return share

    def principal(self, share_token: str, session_cookie: str | None, address: str) -> Principal:
        share = self.find(share_token, address)
        if needs_session(share):
            session_share = (self.access.session_share(sha256_hex(session_cookie), self.clock())
                             if session_cookie else None)
            if session_share is None or not same_secret(session_share, share.share_id):
                raise ShareSessionRequired()
        return Principal(f"share:{share.share_id}", frozenset({"read"}),
                         share=ShareAccess(share.share_id, share.allow_download, share_scope(share)))


class ShareSessionRequired(ApiError):
    status_code, code = 401, "share_session_required"

    def __init__(self) -> None:
        super().__init__("open the share link in a browser first (PIN or use-limited share)",
                         headers={"WWW-Authenticate": 'Cookie realm="dicom-gateway-share"'})


def needs_session(share: ShareRecord) -> bool:
    """A PIN or a use limit: only a counted, PIN-checked viewer session reads the studies."""
    return share.pin_hash is not None or share.max_uses is not None


def check_usable(share: ShareRecord, now: dt.datetime) -> None:
    if share.revoked_at is not None:
        raise Gone("this share link was revoked")
    if share.expires_at <= now:
        raise Gone("this share link has expired")
    if share.locked_at is not None:
        raise Forbidden("this share link is locked after too many wrong PINs; ask the sender for a new one")


__all__ = [
    "ALL_SCOPES",
    "Authenticator",
    "FailureLimiter",
    "Principal",
    "ShareAccess",
    "ShareGate",
    "ShareSessionRequired",
    "check_usable",
    "needs_session",
    "share_scope",
    "utc_now",
]
