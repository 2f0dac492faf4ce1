"""Secrets: share tokens, session ids and API keys (random, stored as SHA-256), PINs (scrypt).

Share tokens carry 192 random bits, so a fast hash is enough to store them: nobody can
enumerate the space. PINs are short and guessable, hence the slow, salted scrypt and the
attempt limits enforced by the share service.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

#: 24 random bytes: 192 bits, 32 URL-safe characters.
TOKEN_BYTES = 24
API_KEY_PREFIX = "dgw"
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def new_token() -> str:
    """An opaque URL-safe random token (share link, viewer session)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def same_secret(presented: str, expected: str) -> bool:
    """Constant-time comparison of two secrets (or of their hashes)."""
    return hmac.compare_digest(presented.encode(), expected.encode())


def new_api_key() -> tuple[str, str]:
    """(key id, full key): the key is `dgw_<id>_<secret>`; only its id and hash are stored."""
    key_id = secrets.token_hex(8)
    return key_id, f"{API_KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def split_api_key(presented: str) -> str | None:
    """The key id of something shaped like an API key, else None."""
    prefix, _, rest = presented.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != API_KEY_PREFIX or len(key_id) != 16 or not secret:
        return None
    return key_id


def hash_pin(pin: str) -> str:
    """`scrypt$N$r$p$salt$hash` of a PIN or password, with a fresh 16-byte salt."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        pin.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32
    )
    encode = base64.urlsafe_b64encode
    return (
        f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}$"
        f"{encode(salt).decode()}${encode(digest).decode()}"
    )


def verify_pin(pin: str, stored: str) -> bool:
    """True when `pin` matches the stored scrypt hash (constant-time on the digest)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        computed = hashlib.scrypt(
            pin.encode(),
            salt=base64.urlsafe_b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=32,
        )
    except ValueError:
        return False
    return hmac.compare_digest(computed, base64.urlsafe_b64decode(digest))


def new_pin(digits: int = 6) -> str:
    """A random numeric PIN, for `share create --pin`."""
    return "".join(secrets.choice("0123456789") for _ in range(digits))


__all__ = [
    "hash_pin",
    "new_api_key",
    "new_pin",
    "new_token",
    "same_secret",
    "sha256_hex",
    "split_api_key",
    "verify_pin",
]
