"""Who may see what, as a domain: share links (`shares`, `schemas`, `permissions`), API keys
(`api_keys`), the secrets behind them (`tokens`, `sealed_context`) and the audit trail's
vocabulary (`audit`). Its errors are not HTTP (`errors`); the API and the CLI call it alike
and each maps its errors once."""

from access.api_keys import ALL_SCOPES, ApiKeyService, ApiScope, CreatedApiKey, api_key_public
from access.audit import ACTIONS, EVENT_NAMES, AuditAction, audit_entry
from access.errors import (
    AccessError,
    ApiKeyError,
    ApiKeyNotFound,
    InvalidApiKeyRequest,
    InvalidShareRequest,
    PinCheckBusy,
    ShareEnded,
    ShareError,
    ShareLocked,
    ShareNotFound,
    WrongPin,
)
from access.permissions import Permission, permissions_of
from access.schemas import (
    AccessLogEntry,
    SeriesRef,
    ShareCreate,
    ShareCreated,
    SharePublic,
    share_audit_detail,
)
from access.shares import (
    Clock,
    CreatedShare,
    SharePolicy,
    ShareRequest,
    ShareService,
    check_usable,
    needs_session,
    share_scope,
    share_status,
    utc_now,
)
from access.tokens import hash_pin, new_api_key, new_pin, sha256_hex

__all__ = [
    "ACTIONS",
    "ALL_SCOPES",
    "EVENT_NAMES",
    "AccessError",
    "AccessLogEntry",
    "ApiKeyError",
    "ApiKeyNotFound",
    "ApiKeyService",
    "ApiScope",
    "AuditAction",
    "Clock",
    "CreatedApiKey",
    "CreatedShare",
    "InvalidApiKeyRequest",
    "InvalidShareRequest",
    "Permission",
    "PinCheckBusy",
    "SeriesRef",
    "ShareCreate",
    "ShareCreated",
    "ShareEnded",
    "ShareError",
    "ShareLocked",
    "ShareNotFound",
    "SharePolicy",
    "SharePublic",
    "ShareRequest",
    "ShareService",
    "WrongPin",
    "api_key_public",
    "audit_entry",
    "check_usable",
    "hash_pin",
    "needs_session",
    "new_api_key",
    "new_pin",
    "permissions_of",
    "sha256_hex",
    "share_audit_detail",
    "share_scope",
    "share_status",
    "utc_now",
]
