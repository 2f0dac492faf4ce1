"""What a share or an API key operation refuses, in the domain's words: the services and the
share gate raise these, never an HTTP error; each edge maps them once — the API to its JSON
or page answers (`web_viewer_api.errors.as_api_error`), the CLI to its message."""

from __future__ import annotations


class AccessError(Exception):
    """A share or an API key cannot do what was asked."""

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: Seconds after which asking again may succeed (a busy PIN check).
        self.retry_after = retry_after


class ShareError(AccessError):
    """A share cannot do what was asked."""


class InvalidShareRequest(ShareError):
    """What was asked for a new share breaks a rule (UIDs, expiry, PIN, uses, context)."""


class ShareNotFound(ShareError):
    """No such share, study or series (or none the caller may see)."""


class ShareEnded(ShareError):
    """The share was revoked, has expired or has been used the maximum number of times."""


class ShareLocked(ShareError):
    """The share locked itself after too many wrong PINs."""


class WrongPin(ShareError):
    """The PIN is missing or wrong; the message says how many attempts are left."""


class PinCheckBusy(ShareError):
    """Other PIN attempts on this share are being checked: ask again shortly."""


class ApiKeyError(AccessError):
    """An API key cannot be made or changed as asked."""


class InvalidApiKeyRequest(ApiKeyError):
    """A name, scope or site that breaks a rule."""


class ApiKeyNotFound(ApiKeyError):
    """No such active key."""


__all__ = [
    "AccessError",
    "ApiKeyError",
    "ApiKeyNotFound",
    "InvalidApiKeyRequest",
    "InvalidShareRequest",
    "PinCheckBusy",
    "ShareEnded",
    "ShareError",
    "ShareLocked",
    "ShareNotFound",
    "WrongPin",
]
