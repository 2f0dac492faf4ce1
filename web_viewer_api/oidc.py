"""OIDC bearer tokens (e.g. Pro Santé Connect): signature checked against the issuer's JWKS
(PyJWT), issuer/audience/expiry enforced, a claim mapped to our scopes."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

from web_viewer_api.errors import Unauthorized

KNOWN_SCOPES = frozenset({"read", "write", "share", "admin"})


@dataclass(frozen=True)
class OidcConfig:
    issuer: str
    audience: str
    #: None: read `jwks_uri` from the issuer's /.well-known/openid-configuration.
    jwks_url: str | None = None
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256")
    #: Claim holding roles or scopes; a dotted path reaches nested claims (realm_access.roles).
    scope_claim: str = "scope"
    #: Claim value -> our scopes. Empty: values named read/write/share/admin count as-is.
    scope_map: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    subject_claim: str = "sub"
    #: Claim naming the site(s) a user belongs to — a string, space-separated names or a
    #: list — (those sites' studies only); None: all sites.
    site_claim: str | None = None
    leeway_seconds: int = 30


_SITE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class OidcIdentity:
    subject: str
    scopes: frozenset[str]
    #: None: every site's studies.
    site_ids: frozenset[str] | None


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    value: Any = claims
    for name in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(name)
    return value


def _http_url(url: str) -> str:
    """Only http(s) URLs are fetched (no file:, ftp:, ... from a configuration or a
    discovery document)."""
    if not url.lower().startswith(("https://", "http://")):
        raise Unauthorized("the identity provider's URLs must be http(s)")
    return url


class OidcVerifier:
    """Validates JWT access tokens; JWKS keys are fetched once and cached (refetched for an
    unknown `kid`, which is how key rotation shows up)."""

    def __init__(self, config: OidcConfig, timeout: float = 5.0) -> None:
        self.config = config
        self.timeout = timeout
        self._jwks: jwt.PyJWKClient | None = None

    def _client(self) -> jwt.PyJWKClient:
        if self._jwks is None:
            url = self.config.jwks_url
            if url is None:
                discovery = _http_url(
                    self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
                )
                with urllib.request.urlopen(discovery, timeout=self.timeout) as answer:  # nosec B310
                    url = str(json.load(answer)["jwks_uri"])
            url = _http_url(url)
            self._jwks = jwt.PyJWKClient(
                url, cache_keys=True, lifespan=3600, timeout=int(self.timeout)
            )
        return self._jwks

    def verify(self, token: str) -> OidcIdentity:
        """The identity behind a valid token; Unauthorized for anything else."""
        config = self.config
        try:
            key = self._client().get_signing_key_from_jwt(token)
            claims = jwt.decode(
                token,
                key.key,
                algorithms=list(config.algorithms),
                audience=config.audience,
                issuer=config.issuer,
                leeway=config.leeway_seconds,
                options={"require": ["exp", "iat", "iss", "aud"]},
            )
        except (jwt.PyJWTError, OSError, ValueError, KeyError) as exc:
            raise Unauthorized("invalid bearer token") from exc
        subject = _claim(claims, config.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise Unauthorized("invalid bearer token")
        raw = _claim(claims, config.scope_claim)
        values = raw.split() if isinstance(raw, str) else [str(v) for v in raw or []]
        scopes: set[str] = set()
        for value in values:
            if config.scope_map:
                scopes.update(config.scope_map.get(value, ()))
            elif value in KNOWN_SCOPES:
                scopes.add(value)
        site_ids: frozenset[str] | None = None
        if config.site_claim:
            site = _claim(claims, config.site_claim)
            names = (
                site.split()
                if isinstance(site, str)
                else ([v for v in site if isinstance(v, str)] if isinstance(site, list) else [])
            )
            # Only well-formed site ids: "" would open studies indexed without a site.
            if not names or not all(_SITE_ID.fullmatch(n) for n in names):
                raise Unauthorized("the bearer token names no valid site")
            site_ids = frozenset(names)
        return OidcIdentity(subject, frozenset(scopes & KNOWN_SCOPES), site_ids)


__all__ = ["OidcConfig", "OidcIdentity", "OidcVerifier"]
