"""Who is calling: the admin token, API keys, OIDC bearer tokens, share links; and the
limits on failed attempts, counted against what failed (an API key id, a share) or, for
tokens that open nothing, the client address."""

from __future__ import annotations

import datetime as dt
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from threading import Lock
from typing import TypeVar

from access import (
    ALL_SCOPES,
    Clock,
    Permission,
    ShareEnded,
    check_usable,
    needs_session,
    share_scope,
    utc_now,
)
from access.tokens import same_secret, sha256_hex, split_api_key
from storage import EVERY_SITE, AccessRepository, AccessScope, ApiKeyRecord, ShareRecord
from web_viewer_api.errors import ApiError, NotFound, RateLimited, Unauthorized
from web_viewer_api.oidc import OidcVerifier

_Item = TypeVar("_Item")


@dataclass(frozen=True)
class ShareAccess:
    """What a share link opens."""

    share_id: str
    #: What it allows beyond viewing.
    permissions: frozenset[str]
    scope: AccessScope


@dataclass(frozen=True)
class Principal:
    """Who is calling and what they may do; `subject` is the audit trail's actor."""

    subject: str
    scopes: frozenset[str]
    #: None: every site's studies.
    site_ids: frozenset[str] | None = None
    share: ShareAccess | None = None

    def may(self, permission: Permission) -> bool:
        """What a share allows beyond viewing; any other caller that reads may."""
        return self.share is None or permission in self.share.permissions

    @property
    def scope(self) -> AccessScope:
        """The studies this caller may see (`EVERY_SITE`: all)."""
        if self.share is not None:
            return self.share.scope
        if self.site_ids is not None:
            return AccessScope(site_ids=self.site_ids)
        return EVERY_SITE


@dataclass
class FailureLimiter:
    """Counts failures per key (a client address, an API key id) and refuses (429) a key
    that failed `limit` times within `window_seconds`, for one window after its last
    failure.

    Failures are remembered in this process and, for several API processes, counted in the
    audit trail they all write (`count_recorded(key, since)`). The limiter never stands
    between a valid credential and its answer: callers check the credential first and
    consult the limiter only for a failure (see docs/admin/security/lockout.md).
    """

    limit: int
    window_seconds: float
    count_recorded: Callable[[str, dt.datetime], int] | None = None
    clock: Callable[[], float] = time.monotonic
    #: Said in the 429: what failed too often ("from this address", "with this API key").
    subject: str = "from this address"
    _recent: dict[str, deque[float]] = field(default_factory=dict)
    _blocked_until: dict[str, float] = field(default_factory=dict)
    _lock: Lock = field(default_factory=Lock)

    def blocked_for(self, key: str) -> float:
        """Seconds `key` stays blocked (0: not blocked)."""
        with self._lock:
            until = self._blocked_until.get(key)
            return max(0.0, until - self.clock()) if until is not None else 0.0

    @property
    def message(self) -> str:
        return f"too many failed attempts {self.subject}; try later"

    def failed(self, key: str) -> float:
        """Count one failure of `key`; block it when it reaches the limit. Returns the
        seconds `key` was already blocked for (0: it was not): the caller then answers 429
        instead of the failure's own error — an invalid attempt of a blocked key is still
        checked, counted (keeping the block alive) and refused."""
        was_blocked = self.blocked_for(key)
        now = self.clock()
        with self._lock:
            recent = self._recent.setdefault(key, deque())
            recent.append(now)
            while recent and recent[0] < now - self.window_seconds:
                recent.popleft()
            earlier = len(recent) - 1
            if len(self._recent) > 100_000:  # bounded memory under a spray of keys
                self._recent = {
                    a: d
                    for a, d in self._recent.items()
                    if d and d[-1] >= now - self.window_seconds
                }
                self._blocked_until = {a: u for a, u in self._blocked_until.items() if u > now}
        if self.count_recorded is not None and earlier < self.limit:
            # Other API processes' failures of this key (this one not yet written): a key
            # another process blocked is blocked here too.
            since = utc_now() - dt.timedelta(seconds=self.window_seconds)
            earlier = max(earlier, self.count_recorded(key, since))
        if earlier >= self.limit:
            was_blocked = was_blocked or self.window_seconds
        if earlier + 1 >= self.limit:
            with self._lock:
                self._blocked_until[key] = now + self.window_seconds
        return was_blocked


class CredentialRefused(Unauthorized):
    """A presented bearer token that opens nothing. `key_id`: the API key it names, when
    that key exists (its failures count against the key, not the address)."""

    def __init__(self, message: str, key_id: str | None = None) -> None:
        super().__init__(message, presented=True)
        self.key_id = key_id


class CredentialBlocked(RateLimited):
    """A refused bearer token whose key id (or, without one, address) is blocked."""

    def __init__(self, message: str, retry_after: float, key_id: str | None = None) -> None:
        super().__init__(message, retry_after=max(1, int(retry_after)))
        self.key_id = key_id


@dataclass
class Authenticator:
    """Resolves credentials to a Principal. Every comparison of secrets is constant-time.

    Failures are counted against what failed: the wrong secret of an existing API key
    against that key id (`key_limiter`), any other token that opens nothing (unknown,
    malformed, a wrong admin token, an invalid OIDC token) against the client address
    (`limiter`). A valid credential is served whatever was counted."""

    admin_token: str
    access: AccessRepository | None
    oidc: OidcVerifier | None
    limiter: FailureLimiter
    key_limiter: FailureLimiter
    clock: Clock = utc_now

    def admin(self, token: str) -> Principal | None:
        if same_secret(token, self.admin_token):
            return Principal("admin", ALL_SCOPES)
        return None

    def authenticate(self, token: str, address: str) -> Principal:
        """API key or OIDC token (may touch the database or the issuer: call in a thread).
        Raises CredentialRefused (401), or RateLimited (429) when what failed was already
        blocked; either way the failure is counted."""
        try:
            return self._resolve(token)
        except CredentialRefused as exc:
            limiter = self.key_limiter if exc.key_id is not None else self.limiter
            blocked = limiter.failed(exc.key_id if exc.key_id is not None else address)
            if blocked:
                raise CredentialBlocked(limiter.message, blocked, exc.key_id) from None
            raise

    @staticmethod
    def key_principal(token: str, key_id: str, record: ApiKeyRecord | None) -> Principal | None:
        """The principal of API key `token` (id `key_id`, its stored `record`), or None when
        the key is unknown, revoked or its secret differs."""
        # Hash even when the key is unknown: the answer takes as long either way.
        presented = sha256_hex(token)
        if (
            record is not None
            and record.revoked_at is None
            and same_secret(presented, record.secret_sha256)
        ):
            return Principal(f"key:{key_id}", record.scopes, record.site_ids)
        return None

    def _resolve(self, token: str) -> Principal:
        key_id = split_api_key(token)
        if key_id is not None and self.access is not None:
            record = self.access.api_key(key_id)
            principal = self.key_principal(token, key_id, record)
            if principal is None:
                raise CredentialRefused(
                    "invalid or revoked API key", key_id if record is not None else None
                )
            return principal
        if self.oidc is not None and token.count(".") == 2:
            try:
                identity = self.oidc.verify(token)
            except Unauthorized as exc:
                raise CredentialRefused(exc.message) from exc
            return Principal(f"oidc:{identity.subject}", identity.scopes, identity.site_ids)
        raise CredentialRefused("invalid bearer token")


@dataclass
class ShareGate:
    """Opens a share link: unknown token 404, expired/revoked/used up 410, locked 403,
    a PIN or a use limit needs a viewer session (cookie) first.

    A known link is served whatever its address did; unknown tokens count against the
    address, and one blocked answers 429 to them (still looked up, still counted)."""

    access: AccessRepository
    limiter: FailureLimiter
    clock: Clock = utc_now
    #: A viewer session ends this long after its last request (never after its share).
    session_lifetime: dt.timedelta = dt.timedelta(minutes=30)

    def find(self, share_token: str, address: str) -> ShareRecord:
        """The live share behind a token; counts unknown tokens against the address."""
        share = self.access.share_by_token(sha256_hex(share_token))
        if share is None:
            blocked = self.limiter.failed(address)
            raise UnknownShareToken(
                RateLimited(self.limiter.message, max(1, int(blocked)))
                if blocked
                else NotFound("not found")
            )
        check_usable(share, self.clock())
        return share

    def principal(self, share_token: str, session_cookie: str | None, address: str) -> Principal:
        share = self.find(share_token, address)
        if needs_session(share):
            now = self.clock()
            digest = sha256_hex(session_cookie) if session_cookie else ""
            session = self.access.session_share(digest, now) if session_cookie else None
            if session is None or not same_secret(session[0], share.share_id):
                raise ShareSessionRequired()
            # Activity renews the session (one write a minute at most), up to the share's end.
            renewed = min(now + self.session_lifetime, share.expires_at)
            if renewed - session[1] >= min(_RENEW_STEP, self.session_lifetime / 10):
                self.access.renew_session(digest, renewed)
        return Principal(
            f"share:{share.share_id}",
            frozenset({"read"}),
            share=ShareAccess(share.share_id, share.permissions, share_scope(share)),
        )

    def live(self, share_id: str) -> None:
        """Raises (410, 403) when the share was revoked, has expired or was locked since it
        was opened: running downloads check it between objects."""
        share = self.access.share(share_id)
        if share is None:
            raise ShareEnded("this share link was revoked")
        check_usable(share, self.clock())

    def while_live(
        self, share_id: str, items: Iterable[_Item], interval_seconds: float
    ) -> Iterator[_Item]:
        """`items` one by one while the share stays live: before each, at most once per
        `interval_seconds` (one indexed read), `live` is checked, and a share revoked,
        expired or locked since ends the iteration with its error — a running download
        is cut off (never completed-looking) soon after the sender revokes it."""
        checked = time.monotonic()
        for item in items:
            if time.monotonic() - checked >= interval_seconds:
                self.live(share_id)
                checked = time.monotonic()
            yield item


_RENEW_STEP = dt.timedelta(minutes=1)


class UnknownShareToken(ApiError):
    """No share has this token: the 404 to answer, or the 429 of a blocked address."""

    def __init__(self, answer: ApiError) -> None:
        super().__init__(answer.message, headers=answer.headers)
        self.status_code, self.code = answer.status_code, answer.code


class ShareSessionRequired(ApiError):
    status_code, code = 401, "share_session_required"

    def __init__(self) -> None:
        super().__init__(
            "open the share link in a browser first (PIN or use-limited share)",
            headers={"WWW-Authenticate": 'Cookie realm="dicom-gateway-share"'},
        )


__all__ = [
    "Authenticator",
    "CredentialBlocked",
    "CredentialRefused",
    "FailureLimiter",
    "Principal",
    "ShareAccess",
    "ShareGate",
    "ShareSessionRequired",
    "UnknownShareToken",
]
