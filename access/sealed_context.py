"""A share's sealed context: what only the recipient may read.

The producing site knows who the patient is; the region must not. A share may carry the
site's clinical context (patient name, birth date, real exam date, clinical question...)
sealed at the site: a JSON object of strings encrypted with AES-256-GCM under a fresh random
key. The index stores the ciphertext; the key is written only in the link's fragment
(`/s/<token>#k=<key>`), which browsers never send to a server, and the viewer decrypts it in
the browser (WebCrypto). No server, log, audit row or database ever holds the key, so the
region can never read the context, at rest or in transit.

Format: ``v1.<iv>.<ciphertext and tag>``, each part base64url without padding; a 96-bit IV;
the additional authenticated data is `AAD` (a sealed value cannot be taken for another
format). The key is 256 bits, base64url without padding (43 characters).
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from collections.abc import Mapping

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["AAD", "FIELDS", "MAX_SEALED_LENGTH", "check_sealed", "seal", "unseal"]

AAD = b"dicom-gateway share context v1"
#: What the viewer shows first, in this order (other keys follow, as given).
FIELDS = (
    "patient_name",
    "patient_birth_date",
    "patient_id",
    "exam_date",
    "clinical_question",
    "comment",
)
#: Largest sealed context accepted (about 12 KB of text once encrypted).
MAX_SEALED_LENGTH = 16_384
_SEALED = re.compile(r"^v1\.[A-Za-z0-9_-]{16}\.[A-Za-z0-9_-]{22,}$")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def seal(context: Mapping[str, str]) -> tuple[str, str]:
    """(sealed context, key) for a context of strings; done at the producing site."""
    if not context or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in context.items()
    ):
        raise ValueError("the context is a non-empty object of text values")
    key = AESGCM.generate_key(bit_length=256)
    iv = secrets.token_bytes(12)
    plain = json.dumps(dict(context), ensure_ascii=False).encode()
    sealed = f"v1.{_b64(iv)}.{_b64(AESGCM(key).encrypt(iv, plain, AAD))}"
    return check_sealed(sealed), _b64(key)


def unseal(sealed: str, key: str) -> dict[str, str]:
    """The context (what the viewer does in the browser; for tests and tools)."""
    _, iv, body = check_sealed(sealed).split(".")
    context = json.loads(AESGCM(_unb64(key)).decrypt(_unb64(iv), _unb64(body), AAD))
    if not isinstance(context, dict):
        raise TypeError("not a sealed context")
    return {str(k): str(v) for k, v in context.items()}


def check_sealed(sealed: str) -> str:
    """`sealed` if it has the sealed form (a server can check no more: it has no key)."""
    if len(sealed) > MAX_SEALED_LENGTH or not _SEALED.match(sealed):
        raise ValueError(
            "sealed_context: expected v1.<iv>.<ciphertext> (base64url), "
            f"at most {MAX_SEALED_LENGTH} characters"
        )
    return sealed
