"""De-identification: the PS3.15 confidentiality profile as data, applied with keyed pseudonyms.

Pure functions over pydicom datasets (plus `cryptography` for the reversible option);
no I/O, no configuration reading.
"""

from anonymize.actions import (
    DEFAULT_INS_ISSUER_OIDS,
    DEFAULT_INS_NAMESPACES,
    DEFAULT_OPTIONS,
    DOMAIN_OPTIONS,
    READING_DESCRIPTORS,
    DeidentificationError,
    DeidentificationPolicy,
    DeidentificationResult,
    DomainIdentity,
    InsIssuers,
    InvalidUIDError,
    accession_qualifier,
    deidentify,
    is_ins_shaped,
    is_oid,
    patient_key,
    pseudonymize_accession_number,
    pseudonymize_patient_id,
)
from anonymize.clean import TextCleaner
from anonymize.iod import AttributeType, iod_types, known_sop_classes
from anonymize.keys import PseudonymKeys, WeakSecretError
from anonymize.options import OPTION_CODES, ProfileOption
from anonymize.pixels import BurnedInAnnotationRisk, PixelMask, PixelPolicy
from anonymize.private import SafePrivateAttributes, load_safe_private
from anonymize.profile import Action, ConfidentialityProfile, ProfileRow, load_profile
from anonymize.reversible import (
    ReidentificationError,
    decrypt_original_attributes,
    load_certificate,
    restore_identity,
)
from anonymize.values import uid_problem, valid_value

__all__ = [
    "DEFAULT_INS_ISSUER_OIDS",
    "DEFAULT_INS_NAMESPACES",
    "DEFAULT_OPTIONS",
    "DOMAIN_OPTIONS",
    "OPTION_CODES",
    "READING_DESCRIPTORS",
    "Action",
    "AttributeType",
    "BurnedInAnnotationRisk",
    "ConfidentialityProfile",
    "DeidentificationError",
    "DeidentificationPolicy",
    "DeidentificationResult",
    "DomainIdentity",
    "InsIssuers",
    "InvalidUIDError",
    "PixelMask",
    "PixelPolicy",
    "ProfileOption",
    "ProfileRow",
    "PseudonymKeys",
    "ReidentificationError",
    "SafePrivateAttributes",
    "TextCleaner",
    "WeakSecretError",
    "accession_qualifier",
    "decrypt_original_attributes",
    "deidentify",
    "iod_types",
    "is_ins_shaped",
    "is_oid",
    "known_sop_classes",
    "load_certificate",
    "load_profile",
    "load_safe_private",
    "patient_key",
    "pseudonymize_accession_number",
    "pseudonymize_patient_id",
    "restore_identity",
    "uid_problem",
    "valid_value",
]
