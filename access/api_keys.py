"""API keys: made (the key shown once, only its hash kept), listed, revoked; for the CLI and
any other edge alike. What a key may do is a set of scopes; a key may be limited to sites."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from access.errors import ApiKeyNotFound, InvalidApiKeyRequest
from access.shares import Clock, utc_now
from access.tokens import new_api_key, sha256_hex
from storage import AccessRepository, ApiKeyRecord


class ApiScope(StrEnum):
    READ = "read"
    WRITE = "write"
    #: Creates share links (of its sites' studies); alone, reads no images.
    SHARE = "share"
    ADMIN = "admin"


ALL_SCOPES: frozenset[str] = frozenset(ApiScope)
_SITE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class CreatedApiKey:
    record: ApiKeyRecord
    #: Shown once, never stored.
    key: str


class ApiKeyService:
    def __init__(self, access: AccessRepository, clock: Clock = utc_now) -> None:
        self.access, self.clock = access, clock

    def create(
        self, name: str, scopes: Iterable[str], site_ids: Iterable[str] | None = None
    ) -> CreatedApiKey:
        wanted = frozenset(scopes)
        unknown = sorted(wanted - ALL_SCOPES)
        if unknown:
            raise InvalidApiKeyRequest(
                f"unknown scope {unknown[0]!r} (known: {', '.join(s.value for s in ApiScope)})"
            )
        if not wanted:
            raise InvalidApiKeyRequest("give at least one scope")
        if not name.strip() or len(name) > 256:
            raise InvalidApiKeyRequest("name: 1 to 256 characters")
        sites = frozenset(site_ids) if site_ids else None
        bad = sorted(s for s in sites or () if not _SITE_ID.fullmatch(s))
        if bad:
            raise InvalidApiKeyRequest(f"not a site id: {bad[0]!r}")
        key_id, key = new_api_key()
        record = ApiKeyRecord(
            key_id=key_id,
            name=name,
            scopes=wanted,
            site_ids=sites,
            created_at=self.clock(),
            revoked_at=None,
            secret_sha256=sha256_hex(key),
        )
        self.access.add_api_key(record)
        return CreatedApiKey(record, key)

    def list(self) -> list[ApiKeyRecord]:
        return self.access.list_api_keys()

    def revoke(self, key_id: str) -> None:
        if not self.access.revoke_api_key(key_id, self.clock()):
            raise ApiKeyNotFound(f"no active API key {key_id}")


def api_key_public(record: ApiKeyRecord) -> dict[str, Any]:
    """What is shown of a key (never its secret or hash)."""
    return {
        "id": record.key_id,
        "name": record.name,
        "scopes": sorted(record.scopes),
        "sites": sorted(record.site_ids) if record.site_ids is not None else None,
        "created_at": record.created_at.isoformat(),
        "revoked_at": record.revoked_at.isoformat() if record.revoked_at else None,
    }


__all__ = ["ALL_SCOPES", "ApiKeyService", "ApiScope", "CreatedApiKey", "api_key_public"]
