"""De-identification: the PS3.15 confidentiality profile as data, applied with keyed pseudonyms.

Pure functions over pydicom datasets; no I/O, no configuration reading.
"""

from anonymize.actions import (
    DEFAULT_INS_ISSUER_OIDS,
    DeidentificationError,
    DeidentificationPolicy,
    DeidentificationResult,
    accession_qualifier,
    deidentify,
    patient_key,
)
from anonymize.keys import PseudonymKeys, WeakSecretError
from anonymize.profile import Action, ConfidentialityProfile, ProfileRow, load_profile

__all__ = [
    "DEFAULT_INS_ISSUER_OIDS",
    "Action",
    "ConfidentialityProfile",
    "DeidentificationError",
    "DeidentificationPolicy",
    "DeidentificationResult",
    "ProfileRow",
    "PseudonymKeys",
    "WeakSecretError",
    "accession_qualifier",
    "deidentify",
    "load_profile",
    "patient_key",
]
