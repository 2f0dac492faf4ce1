"""Keyed pseudonyms: HMAC-SHA256 under the secret of a pseudonymization domain.

Every output is a pure function of (secret, input), so it is stable across studies,
sites, workers and restarts without a mapping table, and the gateway can find a study
from an original identifier by recomputing the HMAC.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass

# Domain-separation labels: the same input never yields the same digest for two uses.
_LABEL_UID = b"dicom-gateway/uid/v1\x00"
_LABEL_PATIENT = b"dicom-gateway/patient/v1\x00"
_LABEL_ACCESSION = b"dicom-gateway/accession/v1\x00"
_LABEL_DATE_SHIFT = b"dicom-gateway/date-shift/v1\x00"
_LABEL_TEXT = b"dicom-gateway/text/v1\x00"

MIN_SECRET_BYTES = 16


class WeakSecretError(ValueError):
    """The pseudonymization secret is too short to resist a dictionary attack."""


_PATIENT_PSEUDONYM = re.compile(r"P[A-Z2-7]{16}")


@dataclass(frozen=True)
class PseudonymKeys:
    """Derives every pseudonym of one pseudonymization domain from its secret."""

    secret: bytes
    max_date_shift_days: int = 365

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_SECRET_BYTES:
            raise WeakSecretError(
                f"pseudonymization secret must be at least {MIN_SECRET_BYTES} bytes"
            )

    def _digest(self, label: bytes, value: str) -> bytes:
        return hmac.new(self.secret, label + value.encode("utf-8"), hashlib.sha256).digest()

    def uid(self, original_uid: str) -> str:
        """Map a UID to a `2.25.` UID (PS3.5 B.2): 128 bits of the HMAC as a decimal."""
        digest = self._digest(_LABEL_UID, original_uid.strip().rstrip("\x00"))
        return "2.25." + str(int.from_bytes(digest[:16], "big"))

    def patient_id(self, patient_key: str) -> str:
        """A patient pseudonym (LO, 18 chars) from a patient key (see `patient_key`)."""
        digest = self._digest(_LABEL_PATIENT, patient_key)
        return "P" + base64.b32encode(digest[:10]).decode("ascii").rstrip("=")[:16].upper()

    @staticmethod
    def is_patient_pseudonym(value: str) -> bool:
        """Whether `value` has the shape of a patient pseudonym (`patient_id`): what any
        object of a pseudonymization domain carries as its Patient ID."""
        return _PATIENT_PSEUDONYM.fullmatch(value) is not None

    def patient_name(self, patient_key: str) -> str:
        """A PN value that says it is a pseudonym and links to the patient pseudonym."""
        return f"ANONYMOUS^{self.patient_id(patient_key)}"

    def accession_number(self, original_accession: str, qualifier: str) -> str:
        """An accession pseudonym (SH, 16 chars), qualified by its issuer or site."""
        digest = self._digest(_LABEL_ACCESSION, f"{qualifier}\x00{original_accession.strip()}")
        return "A" + base64.b32encode(digest[:10]).decode("ascii")[:15]

    def text(self, value: str) -> str:
        """A short opaque token for an identifying string value (SH-safe, 16 chars)."""
        digest = self._digest(_LABEL_TEXT, value.strip())
        return "X" + base64.b32encode(digest[:10]).decode("ascii")[:15]

    def date_shift_days(self, patient_key: str) -> int:
        """Days to subtract from every date of a patient: 1..max, the same for all studies."""
        digest = self._digest(_LABEL_DATE_SHIFT, patient_key)
        return 1 + int.from_bytes(digest[:4], "big") % self.max_date_shift_days
