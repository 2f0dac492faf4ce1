"""Apply the PS3.15 Basic Application Level Confidentiality Profile, with its options.

Every attribute of Table E.1-1 gets its action, at any nesting depth:

- D (dummy), Z (zero length), X (remove), K (keep), U (keyed UID), C (clean) as the
  standard defines them; the compound actions X/Z, X/D, Z/D, X/Z/D are resolved by the
  attribute's type in the instance's IOD (1 → dummy, 2 → empty, 3 → remove; an unknown
  IOD keeps a dummy or empty value rather than risk a non-conformant object);
- X/Z/U* reference sequences are kept with every UID inside remapped, so references
  between de-identified instances stay valid (never emptied);
- a sequence replaced by a dummy (D) keeps its structure, but every text value inside is
  replaced too; a sequence that is cleaned (C) keeps its text with identity redacted;
- private attributes are removed, except those on the safe-private list under the Retain
  Safe Private option; curves (50xx) and overlays (60xx) follow their rows;
- PatientID, PatientName and AccessionNumber become keyed pseudonyms (findable again from
  the original by recomputing the HMAC), UIDs become `2.25.` UIDs from the same key, and
  dates move by a per-patient keyed offset under the Modified Dates option.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from cryptography import x509
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import RE_VALID_UID

from anonymize.clean import TextCleaner
from anonymize.iod import AttributeType, iod_types
from anonymize.keys import PseudonymKeys
from anonymize.options import (
    BASIC_PROFILE_CODE,
    CLEAN_PIXEL_DATA_CODE,
    OPTION_CODES,
    ProfileOption,
)
from anonymize.pixels import BurnedInAnnotationRisk, PixelPolicy, apply_mask
from anonymize.private import SafePrivateAttributes, load_safe_private
from anonymize.profile import Action, ConfidentialityProfile, ProfileRow, load_profile
from anonymize.reversible import encrypted_attributes_item
from anonymize.values import CHARACTER_VRS, uid_problem, valid_value
from imaging.dataset import TruncatedDataSetError, check_complete

#: OIDs of the INS assigning authorities (ANS; FR Core, IHE PAM France): INS-NIR, INS-NIA,
#: and the INS-NIR of fictitious test and demonstration patients.
DEFAULT_INS_ISSUER_OIDS = frozenset(
    {"1.2.250.1.213.1.4.8", "1.2.250.1.213.1.4.9", "1.2.250.1.213.1.4.10", "1.2.250.1.213.1.4.11"}
)
#: The namespaces (HL7 HD.1, DICOM IssuerOfPatientID) French sources name those authorities
#: by: PID-3 `<INS>^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.8&ISO^INS`. Test and demonstration
#: INS keep the NIR namespace; only their OID differs (.10, .11).
DEFAULT_INS_NAMESPACES = frozenset({"ASIP-SANTE-INS-NIR", "ASIP-SANTE-INS-NIA"})
DEFAULT_OPTIONS = frozenset(
    {ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES, ProfileOption.CLEAN_DESCRIPTORS}
)
#: The descriptors the Clean Descriptors option keeps (cleaned) by default: what a reading
#: doctor needs to recognise the examination and its series. The option's other descriptors
#: (comments, history, occupation, allergies...) are free text about the person and keep
#: the Basic Profile action; `None` in `DeidentificationPolicy.cleaned_descriptors` keeps
#: the option's whole column.
READING_DESCRIPTORS = frozenset(
    {
        "StudyDescription",
        "SeriesDescription",
        "ProtocolName",
        "RequestedProcedureDescription",
        "PerformedProcedureStepDescription",
        "ContrastBolusAgent",
    }
)

_TAG_PATIENT_NAME = 0x00100010
_TAG_PATIENT_ID = 0x00100020
_TAG_ACCESSION_NUMBER = 0x00080050
_DATE_FORMAT = "%Y%m%d"
_UNDEFINED_LENGTH = 0xFFFFFFFF
_DUMMY_TEXT = "ANONYMIZED"
_DUMMY_BY_VR: dict[str, object] = {
    "PN": "ANONYMOUS",
    "LO": _DUMMY_TEXT,
    "SH": _DUMMY_TEXT,
    "LT": _DUMMY_TEXT,
    "ST": _DUMMY_TEXT,
    "UT": _DUMMY_TEXT,
    "UC": _DUMMY_TEXT,
    "CS": _DUMMY_TEXT,
    "AE": "ANONYMOUS",
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000D",
    "IS": "0",
    "DS": "0",
    "US": 0,
    "SS": 0,
    "UL": 0,
    "SL": 0,
    "FL": 0.0,
    "FD": 0.0,
    "UV": 0,
    "SV": 0,
}
#: Dummies of attributes whose meaning narrows their VR (the VR's dummy would be invalid).
_DUMMY_BY_KEYWORD: dict[str, object] = {"TimezoneOffsetFromUTC": "+0000"}
_FREE_TEXT_VRS = frozenset({"LO", "SH", "LT", "ST", "UT", "UC"})
#: Replaced inside a dummied sequence; CS, AE and code items keep the structure meaningful.
_DUMMY_TEXT_VRS = frozenset({"LO", "SH", "LT", "ST", "UT", "UC", "UR"})
_BULK_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV"})
_WELL_KNOWN_UID_ROOT = "1.2.840.10008."
#: UI attributes that name a class, syntax or scheme, never an instance: never remapped.
_CLASS_UID_KEYWORDS = frozenset(
    {
        "SOPClassesInStudy",
        "CodingSchemeUID",
        "ContextUID",
        "MappingResourceUID",
        "ContextGroupExtensionCreatorUID",
        "PrivateInformationCreatorUID",
        "ImplementationClassUID",
        "TransferSyntaxUID",
        "SOPClassUID",
    }
)


def _is_class_uid_attribute(keyword: str) -> bool:
    return keyword in _CLASS_UID_KEYWORDS or keyword.endswith(("ClassUID", "TransferSyntaxUID"))


#: Identifying attributes Table E.1-1 does not list (yet): removed.
_SUPPLEMENTARY_ROWS: dict[int, ProfileRow] = {
    tag: ProfileRow(f"{tag:08x}", name, Action.REMOVE)
    for tag, name in (
        (0x00100033, "Patient's Birth Date in Alternative Calendar"),
        (0x00100034, "Patient's Death Date in Alternative Calendar"),
        (0x00100024, "Issuer of Patient ID Qualifiers Sequence"),
        (0x00080051, "Issuer of Accession Number Sequence"),
        (0x00081190, "Retrieve URL"),
        (0x0040E010, "Retrieve URI"),
        (0x00400513, "Issuer of the Container Identifier Sequence"),
        (0x04000500, "Encrypted Attributes Sequence (from an earlier de-identifier)"),
    )
}
#: File meta attributes that name the sending/receiving systems.
_META_TAGS_TO_REMOVE = frozenset(
    {
        0x00020012,
        0x00020013,
        0x00020016,
        0x00020017,
        0x00020018,
        0x00020026,
        0x00020027,
        0x00020028,
        0x00020100,
        0x00020102,
    }
)


@dataclass(frozen=True)
class InsIssuers:
    """Who issues the INS (national health identifier): their OIDs and their namespaces."""

    oids: frozenset[str] = DEFAULT_INS_ISSUER_OIDS
    namespaces: frozenset[str] = DEFAULT_INS_NAMESPACES

    def named_by(self, issuer: str) -> bool:
        """`issuer` (an OID or a namespace, as a lookup gives it) is an INS authority."""
        issuer = issuer.strip()
        return issuer in self.oids or issuer in self.namespaces


class DeidentificationError(ValueError):
    """The dataset cannot be de-identified (e.g. it lacks the UIDs that identify it)."""


class _Mode(Enum):
    """How attributes the table does not list are treated inside a sequence."""

    NORMAL = "normal"  # kept (the table lists everything identifying)
    DUMMY = "dummy"  # inside a sequence replaced by a dummy: every text value replaced
    CLEAN = "clean"  # inside a cleaned sequence: free text redacted, names replaced


@dataclass(frozen=True)
class DeidentificationPolicy:
    """What a site decides: its pseudonymization keys, options, private and pixel policies.

    `recipient_certificate` turns on reversible de-identification: the original values are
    stored encrypted for that certificate in the Encrypted Attributes Sequence.
    """

    #: None at the region, which holds no secret and takes only objects of the domain.
    keys: PseudonymKeys | None
    site_id: str
    ins_issuers: InsIssuers = field(default_factory=InsIssuers)
    options: frozenset[ProfileOption] = DEFAULT_OPTIONS
    safe_private: SafePrivateAttributes = field(default_factory=load_safe_private)
    pixel_policy: PixelPolicy = field(default_factory=PixelPolicy)
    recipient_certificate: x509.Certificate | None = None
    profile: ConfidentialityProfile = field(default_factory=load_profile)
    #: Keywords of the descriptors Clean Descriptors keeps, cleaned (the others keep the
    #: Basic Profile action); None for the option's whole column.
    cleaned_descriptors: frozenset[str] | None = READING_DESCRIPTORS
    _descriptor_tags: frozenset[int] | None = field(init=False, compare=False, repr=False)
    #: Whether any action cleans text (see `__post_init__`): only then does a pass build a
    #: cleaner from the instance's identifying values.
    cleans_text: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        both = {
            ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES,
            ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES,
        }
        if both <= self.options:
            raise ValueError("the Full Dates and Modified Dates options exclude each other")
        # Derived from the options alone (not the site): computed once per option set, so
        # a policy copied for another site or a write-back costs nothing here.
        tags = _descriptor_tags(self.profile, self.cleaned_descriptors)
        object.__setattr__(self, "_descriptor_tags", tags)
        object.__setattr__(self, "cleans_text", _cleans_text(self.profile, self.options, tags))

    def action_for(self, row: ProfileRow) -> tuple[str, ProfileOption | None]:
        """The action this policy applies to `row`, and the option that chose it (if any).

        An enabled option that retains (K) wins over one that cleans (C), which wins over
        the Basic Profile action. Clean Descriptors acts only on `cleaned_descriptors`.
        """
        return _action(row, self.options, self._descriptor_tags)


def _action(
    row: ProfileRow, options: frozenset[ProfileOption], descriptor_tags: frozenset[int] | None
) -> tuple[str, ProfileOption | None]:
    clean: ProfileOption | None = None
    for option in options:
        code = row.options.get(option.value)
        if code == "K":
            return "K", option
        if (
            code == "C"
            and clean is None
            and not (
                option is ProfileOption.CLEAN_DESCRIPTORS
                and descriptor_tags is not None
                and (
                    "x" in row.tag
                    or row.tag == "private"
                    or int(row.tag, 16) not in descriptor_tags
                )
            )
        ):
            clean = option
    if clean is not None:
        return "C", clean
    return row.basic.value, None


@functools.lru_cache(maxsize=16)
def _descriptor_tags(
    profile: ConfidentialityProfile, cleaned_descriptors: frozenset[str] | None
) -> frozenset[int] | None:
    """The tags of `cleaned_descriptors` (keywords), each a C row of Clean Descriptors."""
    if cleaned_descriptors is None:
        return None
    column = ProfileOption.CLEAN_DESCRIPTORS.value
    by_keyword = {
        keyword_for_tag(tag): tag
        for tag, row in profile.rows.items()
        if row.options.get(column) == "C"
    }
    unknown = sorted(set(cleaned_descriptors) - set(by_keyword))
    if unknown:
        raise ValueError(f"not descriptors of the Clean Descriptors option: {', '.join(unknown)}")
    return frozenset(by_keyword[k] for k in cleaned_descriptors)


@functools.lru_cache(maxsize=16)
def _cleans_text(
    profile: ConfidentialityProfile,
    options: frozenset[ProfileOption],
    descriptor_tags: frozenset[int] | None,
) -> bool:
    """Whether any action cleans text: a C action of an option (Retain Longitudinal
    Modified Dates' C shifts dates instead), inside a sequence such an action cleans, or
    private attributes kept by Retain Safe Private."""
    if ProfileOption.RETAIN_SAFE_PRIVATE in options:
        return True
    rows = [*profile.rows.values(), *(row for _, _, row in profile.masked_rows)]
    for row in rows:
        action, option = _action(row, options, descriptor_tags)
        if action == "C" and option is not ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES:
            return True
    return False


@dataclass(frozen=True)
class DomainIdentity:
    """The identity of a stored study an object is written back into (a report, a
    segmentation, a presentation state made on the de-identified images): the object takes
    the study's patient pseudonym, accession pseudonym and date; its UIDs are the domain's
    already and are kept. Nothing is derived from keys, so the region (no secret) can use it."""

    patient_id: str
    accession_number: str = ""
    #: The stored study's (de-identified) date: every date the profile would shift or
    #: replace becomes this date, so no real date enters the domain beside shifted ones.
    study_date: str = ""

    @property
    def patient_name(self) -> str:
        return f"ANONYMOUS^{self.patient_id}"


#: What a write-back keeps that an identified upload loses: its UIDs (the domain's), its
#: structured content and descriptions (made on de-identified data), cleaned of identity.
DOMAIN_OPTIONS = frozenset(
    {
        ProfileOption.RETAIN_UIDS,
        ProfileOption.CLEAN_STRUCTURED_CONTENT,
        ProfileOption.CLEAN_DESCRIPTORS,
    }
)


@dataclass(frozen=True)
class DeidentificationResult:
    """The de-identified identifiers of the instance (no original value is carried)."""

    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    masked: bool = False
    #: When `patient_id` is the INS's pseudonym: the pseudonym of the patient's local ID
    #: (keyed like any), so a lookup by that local ID still finds the study; else "".
    local_patient_id: str = ""


def _issuer_of(item: Dataset) -> str:
    issuer = str(item.get("IssuerOfPatientID", "") or "").strip()
    if not issuer:
        for qualifier in item.get("IssuerOfPatientIDQualifiersSequence", []) or []:
            issuer = str(qualifier.get("UniversalEntityID", "") or "").strip()
            if issuer:
                break
    return issuer


def is_oid(value: str) -> bool:
    """`value` is written as an OID (a UID's syntax), not a namespace."""
    return len(value) <= 64 and RE_VALID_UID.match(value) is not None


def is_ins_shaped(value: str) -> bool:
    """`value` can be an INS matricule: 15 characters, a NIR or NIA (13, the Corsican
    départements 2A/2B allowed) and its key, 97 - (number mod 97)."""
    value = value.strip().upper()
    if len(value) != 15 or not value[13:].isdigit():
        return False
    number = value[:5] + {"2A": "19", "2B": "18"}.get(value[5:7], value[5:7]) + value[7:13]
    return number.isdigit() and int(value[13:]) == 97 - int(number) % 97


def _claims_ins(item: Dataset, issuers: InsIssuers) -> bool:
    """The item's issuer is an INS authority. Every OID it names (IssuerOfPatientID as an
    OID, IssuerOfPatientIDQualifiersSequence > UniversalEntityID) decides: all are INS OIDs
    (`ASIP-SANTE-INS-NIR` + `1.2.250.1.213.1.4.10` is the INS, `ASIP-SANTE-INS-NIR` + a
    hospital's OID is not). Naming none, IssuerOfPatientID must be an INS namespace. An
    IdentifierTypeCode `INS` never decides: any local system can write it."""
    issuer = str(item.get("IssuerOfPatientID", "") or "").strip()
    oids = [issuer] if issuer and is_oid(issuer) else []
    oids += [
        str(q.get("UniversalEntityID", "") or "").strip()
        for q in item.get("IssuerOfPatientIDQualifiersSequence", []) or []
    ]
    oids = [oid for oid in oids if oid]
    if oids:
        return all(oid in issuers.oids for oid in oids)
    return issuer in issuers.namespaces


def _ins_in(item: Dataset, issuers: InsIssuers) -> str | None:
    """The item's patient ID when it is an INS: issued by an INS authority, INS-shaped."""
    value = str(item.get("PatientID", "") or "").strip().upper()
    return value if value and _claims_ins(item, issuers) and is_ins_shaped(value) else None


def _local_key(item: Dataset, site_id: str, issuers: InsIssuers) -> str:
    """The key of a non-INS patient ID: qualified by its issuer, or the site. An ID whose
    issuer names an INS authority but that is no INS (its format or key, a contradicting
    OID) is the site's mistake: qualified by the site, never by a national name that
    would link strangers at two sites."""
    named = [str(item.get("IssuerOfPatientID", "") or "").strip()]
    named += [
        str(q.get("UniversalEntityID", "") or "").strip()
        for q in item.get("IssuerOfPatientIDQualifiersSequence", []) or []
    ]
    issuer = "" if any(issuers.named_by(n) for n in named if n) else _issuer_of(item)
    return local_patient_key(str(item.get("PatientID", "") or ""), issuer, site_id)


def patient_key(dataset: Dataset, site_id: str, ins_issuers: InsIssuers) -> str:
    """The identity a patient pseudonym derives from.

    The national health identifier (INS) when the dataset carries it, as PatientID or in
    OtherPatientIDsSequence, issued by an INS authority however it is written (OID in
    IssuerOfPatientID or in the qualifiers, or an INS namespace) and INS-shaped, so two
    sites link one patient; otherwise the local PatientID qualified by its issuer (or,
    without one, by the site).
    """
    ins = _ins_in(dataset, ins_issuers)
    if ins:
        return f"ins:{ins}"
    for item in dataset.get("OtherPatientIDsSequence", []) or []:
        ins = _ins_in(item, ins_issuers)
        if ins:
            return f"ins:{ins}"
    if not str(dataset.get("PatientID", "") or "").strip():
        # no identity at all: one pseudonym per study, never shared by strangers
        return f"unidentified:{site_id}:{str(dataset.get('StudyInstanceUID', '')).strip()}"
    return _local_key(dataset, site_id, ins_issuers)


def local_patient_key_beside_ins(
    dataset: Dataset, site_id: str, ins_issuers: InsIssuers
) -> str | None:
    """When the patient key is the INS: the key of the patient's local ID (PatientID when it
    is not the INS, else the first other ID that is not), or None."""
    if not patient_key(dataset, site_id, ins_issuers).startswith("ins:"):
        return None
    for item in (dataset, *(dataset.get("OtherPatientIDsSequence", []) or [])):
        if str(item.get("PatientID", "") or "").strip() and not _ins_in(item, ins_issuers):
            return _local_key(item, site_id, ins_issuers)
    return None


def local_patient_key(patient_id: str, issuer: str, site_id: str) -> str:
    """The key of a patient known only by a local ID: qualified by its issuer, or the site."""
    return f"local:{issuer or 'site:' + site_id}:{patient_id.strip()}"


def accession_qualifier(dataset: Dataset, site_id: str) -> str:
    """The namespace an accession number is unique in: its issuer, or the site."""
    for item in dataset.get("IssuerOfAccessionNumberSequence", []) or []:
        for keyword in ("UniversalEntityID", "LocalNamespaceEntityID"):
            value = str(item.get(keyword, "") or "").strip()
            if value:
                return value
    return f"site:{site_id}"


def pseudonymize_patient_id(
    keys: PseudonymKeys,
    patient_id: str,
    *,
    site_id: str,
    issuer: str = "",
    is_ins: bool = False,
    ins_issuers: InsIssuers | None = None,
) -> str:
    """The pseudonym an original patient ID becomes, keyed as de-identification keys it;
    for lookups from the API. The INS when `is_ins` or when `issuer` (an OID or a
    namespace) names an INS authority of `ins_issuers` (default: the ANS's) and the value
    is INS-shaped; an ID such an issuer cannot have issued is keyed as the site's."""
    issuers = InsIssuers() if ins_issuers is None else ins_issuers
    if is_ins or issuers.named_by(issuer):
        value = patient_id.strip().upper()
        key = f"ins:{value}" if is_ins_shaped(value) else local_patient_key(patient_id, "", site_id)
    else:
        key = local_patient_key(patient_id, issuer.strip(), site_id)
    return keys.patient_id(key)


def pseudonymize_accession_number(
    keys: PseudonymKeys, accession_number: str, *, site_id: str, issuer: str = ""
) -> str:
    """The pseudonym an original accession number becomes; for lookups from the API."""
    return keys.accession_number(accession_number, issuer or f"site:{site_id}")


def _shift_date(value: str, days: int) -> str | None:
    try:
        shifted = dt.datetime.strptime(value[:8], _DATE_FORMAT) - dt.timedelta(days=days)
    except ValueError:
        return None
    return shifted.strftime(_DATE_FORMAT) + value[8:]


def _values(element: DataElement) -> list[Any]:
    value = element.value
    if isinstance(value, MultiValue | list):
        return list(value)
    return [value]


class _Deidentifier:
    """One pass over one dataset; holds what the pass derives from the original identity."""

    def __init__(
        self, policy: DeidentificationPolicy, dataset: Dataset, domain: DomainIdentity | None = None
    ) -> None:
        self.policy = policy
        self.domain = domain
        self.options = policy.options
        self.accession_qualifier = accession_qualifier(dataset, policy.site_id)
        self.local_key: str | None = None
        if domain is None:
            self.patient_key = patient_key(dataset, policy.site_id, policy.ins_issuers)
            self.local_key = local_patient_key_beside_ins(
                dataset, policy.site_id, policy.ins_issuers
            )
            self.shift_days = self.keys.date_shift_days(self.patient_key)
            patient_name, patient_id = (
                self.keys.patient_name(self.patient_key),
                self.keys.patient_id(self.patient_key),
            )
        else:  # the study's identity, nothing derived (no key is needed)
            self.patient_key, self.shift_days = "", 0
            patient_name, patient_id = domain.patient_name, domain.patient_id
        self.sop_class = str(dataset.get("SOPClassUID", "") or "")
        self._types: Any = None
        self._all_types: Any = None
        self._drop_overlay_group = ProfileOption.CLEAN_GRAPHICS not in self.options
        charset = dataset.get("SpecificCharacterSet") or "ISO_IR 6"
        self.encodings = convert_encodings(charset)
        # Built now, from the original values: the walk replaces them as it goes; only for a
        # policy that cleans text (the Basic Profile alone never does).
        self._cleaner = TextCleaner(dataset) if policy.cleans_text else None
        self._original = dataset
        self.overrides: dict[int, Callable[[DataElement], None]] = {
            _TAG_PATIENT_NAME: self._set(patient_name),
            _TAG_PATIENT_ID: self._set(patient_id),
            _TAG_ACCESSION_NUMBER: self._accession,
        }

    # Lazily built helpers ----------------------------------------------------------
    @property
    def keys(self) -> PseudonymKeys:
        if self.policy.keys is None:
            raise DeidentificationError(
                "no pseudonymization secret here: only objects of the "
                "domain (written back into a stored study) are taken"
            )
        return self.policy.keys

    @property
    def cleaner(self) -> TextCleaner:
        if self._cleaner is None:  # `policy.cleans_text` said no text is cleaned: a bug
            raise RuntimeError("text cleaning requested without any option")
        return self._cleaner

    def attribute_type(self, path: tuple[str, ...], keyword: str) -> AttributeType | None:
        compound = self.policy.profile.compound_keywords
        if keyword not in compound:  # only an invalid value needs these: built when one shows
            if self._all_types is None:
                self._all_types = iod_types(self.sop_class, None) or False
            types = self._all_types
        else:
            if self._types is None:
                self._types = iod_types(self.sop_class, compound) or False
            types = self._types
        if types is False:
            return None
        result: AttributeType = types.type_of(path, keyword)
        return result

    @staticmethod
    def _set(value: str) -> Callable[[DataElement], None]:
        def apply(element: DataElement) -> None:
            element.value = value

        return apply

    def _accession(self, element: DataElement) -> None:
        if self.domain is not None:
            element.value = self.domain.accession_number
            return
        original = str(element.value or "").strip()
        element.value = (
            self.keys.accession_number(original, self.accession_qualifier) if original else ""
        )

    # The walk ----------------------------------------------------------------------
    def walk(self, dataset: Dataset, path: tuple[str, ...], mode: _Mode) -> None:
        in_code_item = "CodeValue" in dataset or "CodingSchemeDesignator" in dataset
        for tag in sorted(dataset.keys()):
            element = dataset[tag]
            if tag.is_private:
                self._private(dataset, tag, element, path, mode)
                continue
            if self._drop_overlay_group and 0x6000 <= tag.group <= 0x601E and tag.group % 2 == 0:
                del dataset[tag]  # the whole overlay plane goes with its data (PS3.3 C.9.2)
                continue
            if not path and int(tag) in self.overrides:
                self.overrides[int(tag)](element)
                continue
            row = self.policy.profile.row_for(int(tag)) or _SUPPLEMENTARY_ROWS.get(int(tag))
            if row is None:
                self._unlisted(dataset, element, path, mode, in_code_item)
                continue
            self._apply(dataset, element, row, path, mode)
        self._drop_orphan_creators(dataset)

    def _unlisted(
        self,
        dataset: Dataset,
        element: DataElement,
        path: tuple[str, ...],
        mode: _Mode,
        in_code_item: bool,
    ) -> None:
        """Attributes the table does not list: kept, except what can still identify."""
        vr = element.VR
        if vr == "SQ":
            self._recurse(element, path, mode)
        elif vr == "UN":
            del dataset[element.tag]  # undecodable bytes (an unknown tag) cannot be inspected
        elif vr == "UI":
            if not _is_class_uid_attribute(element.keyword):
                self._remap_uid(element)  # instance-like UIDs the table does not list yet
        elif vr == "PN":
            self._dummy(element, path, mode) if mode is not _Mode.NORMAL else self._zero(element)
        elif mode is _Mode.DUMMY and not in_code_item and vr in _DUMMY_TEXT_VRS:
            self._dummy(element, path, mode)
        elif mode is _Mode.DUMMY and vr in ("DA", "DT"):
            if ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES in self.options:
                self._shift(dataset, element, path, mode)
            else:
                self._dummy(element, path, mode)
        elif mode is _Mode.CLEAN and vr in _FREE_TEXT_VRS:
            self._clean_text(element)
            self._keep_if_valid(dataset, element, path, mode)
        elif mode is _Mode.CLEAN:  # kept by a clean (C) action: only a valid value stays
            self._keep_if_valid(dataset, element, path, mode)

    def _recurse(self, element: DataElement, path: tuple[str, ...], mode: _Mode) -> None:
        inner = (*path, element.keyword or f"{int(element.tag):08X}")
        for item in element.value or []:
            self.walk(item, inner, mode)

    def _private(
        self,
        dataset: Dataset,
        tag: BaseTag,
        element: DataElement,
        path: tuple[str, ...],
        mode: _Mode,
    ) -> None:
        """Remove a private attribute unless Retain Safe Private keeps it.

        Kept only when its creator and element are on the safe-private list with the VR the
        list gives; text is still cleaned, UIDs remapped, bulk (O* VRs) kept only when the
        list allows bulk. Creators are dropped afterwards unless something they own stays.
        """
        if ProfileOption.RETAIN_SAFE_PRIVATE not in self.options or tag.element < 0x0010:
            del dataset[tag]
            return
        if tag.element <= 0x00FF:
            if element.VR not in ("LO", "UN"):
                del dataset[tag]  # not a private creator at all
            return  # judged by _drop_orphan_creators
        creator = dataset.get((tag.group, tag.element >> 8)) if tag.element >= 0x1000 else None
        creator_name = ""
        if creator is not None and isinstance(creator.value, str | bytes):
            value = creator.value
            creator_name = value.decode("latin-1") if isinstance(value, bytes) else value
        listed = self.policy.safe_private.vr_of(
            tag.group, creator_name.strip("\x00 "), tag.element & 0xFF
        )
        vr = element.VR
        if listed is None or (vr not in ("UN", listed) and listed):
            del dataset[tag]
            return
        if vr == "UN" and listed and listed not in _BULK_VRS | {"SQ"}:
            vr = listed  # implicit VR: interpret by the table's VR
            if vr in CHARACTER_VRS and isinstance(element.value, bytes):
                text = decode_bytes(element.value, self.encodings, set()).rstrip("\x00 ")
                dataset[tag] = element = DataElement(tag, vr, text)
        if vr == "SQ" or (vr == "UN" and listed == "SQ"):
            if element.VR != "SQ":
                del dataset[tag]  # a sequence we cannot walk (implicit VR) cannot stay
                return
            self._recurse(element, path, _Mode.CLEAN)
        elif vr in _BULK_VRS or vr == "UN":
            if not self.policy.safe_private.retain_bulk:
                del dataset[tag]
        elif vr == "PN":
            self._dummy(element, path, mode)
        elif vr == "UI":
            if ProfileOption.RETAIN_UIDS not in self.options:
                self._remap_uid(element)
        elif vr in _FREE_TEXT_VRS:
            self._clean_text(element)
        elif vr in ("DA", "DT"):
            self._shift(dataset, element, path, mode)
        if element.tag in dataset and not valid_value(vr, element.value, element.keyword or ""):
            del dataset[tag]  # the Safe Private row is a C: an invalid value is not kept

    @staticmethod
    def _drop_orphan_creators(dataset: Dataset) -> None:
        used = {
            (t.group, t.element >> 8)
            for t in dataset.keys()
            if t.is_private and t.element >= 0x1000
        }
        for tag in [t for t in dataset.keys() if t.is_private and 0x0010 <= t.element <= 0x00FF]:
            if (tag.group, tag.element) not in used:
                del dataset[tag]

    def _apply(
        self,
        dataset: Dataset,
        element: DataElement,
        row: ProfileRow,
        path: tuple[str, ...],
        mode: _Mode,
    ) -> None:
        action, option = self.policy.action_for(row)
        if action == "C":
            self._clean(dataset, element, row, path, mode, option)
            return
        if "/" in action and action != "X/Z/U*":
            action = self._resolve(action, path, element)
        self._basic(dataset, element, action, path, mode)

    def _resolve(self, action: str, path: tuple[str, ...], element: DataElement) -> str:
        """A compound action decided by the attribute's type in this IOD (PS3.15 E.1-1)."""
        kind = self.attribute_type(path, element.keyword or "")
        if kind is None:  # unknown IOD: stay present, with nothing identifying
            return "Z" if action == "X/Z" else "D"
        if kind is AttributeType.REQUIRED:
            return "D"
        if kind is AttributeType.REQUIRED_EMPTY_ALLOWED:
            return "Z" if "Z" in action or action == "X/D" else "D"
        return "X" if action.startswith("X") else "Z"

    def _basic(
        self,
        dataset: Dataset,
        element: DataElement,
        action: str,
        path: tuple[str, ...],
        mode: _Mode,
    ) -> None:
        if action == "X":
            del dataset[element.tag]
        elif action == "K":
            if element.VR == "SQ":
                self._recurse(element, path, mode)
        elif action in ("U", "X/Z/U*"):
            if element.VR == "SQ":
                self._recurse(element, path, mode)
            elif action == "U":
                self._remap_uid(element)
            else:
                self._zero(element)
        elif action == "Z":
            self._zero(element)
        else:  # D
            self._dummy(element, path, mode)

    def _clean(
        self,
        dataset: Dataset,
        element: DataElement,
        row: ProfileRow,
        path: tuple[str, ...],
        mode: _Mode,
        option: ProfileOption | None,
    ) -> None:
        vr = element.VR
        if option is ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES:
            if vr in ("DA", "DT"):
                self._shift(dataset, element, path, mode)
                return
            if vr in ("TM", "SH"):
                # whole-day shifts keep times of day and timezone offsets, when valid
                self._keep_if_valid(dataset, element, path, mode)
                return
            # a binary timestamp cannot be shifted: the Basic Profile action stands
            self._basic(dataset, element, self._resolve_basic(row, path, element), path, mode)
            return
        if vr == "SQ":
            self._recurse(element, path, _Mode.CLEAN)
        elif vr == "PN":
            self._dummy(element, path, mode)
        elif vr in _FREE_TEXT_VRS:
            self._clean_text(element)
            self._keep_if_valid(dataset, element, path, mode)
        elif (
            vr in ("DA", "DT") and ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES in self.options
        ):
            self._shift(dataset, element, path, mode)
        elif option is ProfileOption.CLEAN_GRAPHICS and int(element.tag) >> 24 == 0x60:
            # overlay bitmaps under Clean Graphics: kept as they are (documented), if valid
            self._keep_if_valid(dataset, element, path, mode)
        elif vr in ("US", "SS", "UL", "SL", "FL", "FD", "IS", "DS", "CS", "UV", "SV"):
            self._keep_if_valid(dataset, element, path, mode)  # numbers and codes carry no text
        else:  # binary or other values that cannot be cleaned: the Basic Profile action
            self._basic(dataset, element, self._resolve_basic(row, path, element), path, mode)

    def _resolve_basic(self, row: ProfileRow, path: tuple[str, ...], element: DataElement) -> str:
        action = row.basic.value
        return (
            self._resolve(action, path, element) if "/" in action and action != "X/Z/U*" else action
        )

    def _clean_text(self, element: DataElement) -> None:
        if element.value in (None, ""):
            return
        if isinstance(element.value, bytes):
            element.value = None  # undecoded bytes cannot be inspected: drop them
            return
        cleaned = [self.cleaner.clean(str(v)) for v in _values(element)]
        element.value = cleaned if len(cleaned) > 1 else cleaned[0]

    def _keep_if_valid(
        self, dataset: Dataset, element: DataElement, path: tuple[str, ...], mode: _Mode
    ) -> None:
        """Keep the value only if it is valid for the attribute (VR and meaning)."""
        if not valid_value(element.VR, element.value, element.keyword or ""):
            self._not_kept(dataset, element, path, mode)

    def _not_kept(
        self, dataset: Dataset, element: DataElement, path: tuple[str, ...], mode: _Mode
    ) -> None:
        """A value a clean action cannot keep: removed, or emptied or dummied where the IOD
        requires the attribute (resolved as X/Z/D)."""
        self._basic(dataset, element, self._resolve("X/Z/D", path, element), path, mode)

    def _shift(
        self, dataset: Dataset, element: DataElement, path: tuple[str, ...], mode: _Mode
    ) -> None:
        if element.value in (None, ""):
            return
        if self.domain is not None:  # dated like the study: no real date beside shifted ones
            if not self.domain.study_date or not valid_value(element.VR, element.value):
                self._not_kept(dataset, element, path, mode)
                return
            dated = [self.domain.study_date + str(v)[8:] for v in _values(element)]
            element.value = dated if len(dated) > 1 else dated[0]
            return
        shifted = None
        if valid_value(element.VR, element.value):
            shifted = [_shift_date(str(v), self.shift_days) for v in _values(element)]
        if shifted is None or any(v is None for v in shifted):
            # invalid, or coarser than a day (a DT of a year): cannot be shifted safely
            self._not_kept(dataset, element, path, mode)
            return
        element.value = shifted if len(shifted) > 1 else shifted[0]

    def _remap_uid(self, element: DataElement) -> None:
        if element.value in (None, "", b"") or self.domain is not None:
            return  # an object of the domain: its UIDs are the domain's already
        if isinstance(element.value, bytes):  # a UID attribute pydicom did not know (UN)
            text = element.value.decode("ascii", "replace").strip("\x00 ")
            joined = "\\".join(self.keys.uid(v) for v in text.split("\\") if v)
            encoded = joined.encode("ascii")
            element.value = encoded + (b"\x00" if len(encoded) % 2 else b"")
            return
        mapped = [
            str(v) if str(v).startswith(_WELL_KNOWN_UID_ROOT) else self.keys.uid(str(v))
            for v in _values(element)
            if str(v)
        ]
        element.value = mapped if len(mapped) > 1 else (mapped[0] if mapped else "")

    @staticmethod
    def _zero(element: DataElement) -> None:
        element.value = Sequence() if element.VR == "SQ" else None

    def _dummy(self, element: DataElement, path: tuple[str, ...], mode: _Mode) -> None:
        vr = element.VR
        if vr == "SQ":
            # Keep the structure (Type 1 sequences stay valid); replace every value inside.
            inner_mode = _Mode.CLEAN if mode is _Mode.CLEAN else _Mode.DUMMY
            self._recurse(element, path, inner_mode)
        elif vr == "UI":
            self._remap_uid(element)
        elif element.keyword in _DUMMY_BY_KEYWORD:
            element.value = _DUMMY_BY_KEYWORD[element.keyword]
        elif vr in _DUMMY_BY_VR:
            element.value = _DUMMY_BY_VR[vr]
        elif vr in ("OB", "OW", "UN", "OF", "OD", "OL", "OV"):
            element.value = b"\x00" * 8  # a non-empty value that says nothing
        elif vr == "UR":
            element.value = "urn:anonymized"
        else:  # AT and other VRs without a meaningful dummy: empty
            element.value = None


def _code_item(code: tuple[str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code[0], "DCM", code[1]
    return item


class InvalidUIDError(DeidentificationError):
    """A UID the output would carry as it is (the SOP Class UID; any UID under the Retain
    UIDs option) is not a valid UID. The message names the attribute and the fault, never
    the value (an original identifier)."""


def _check_identifiers(dataset: Dataset) -> None:
    try:
        check_complete(dataset)
    except TruncatedDataSetError as exc:  # an instance this profile cannot de-identify
        raise DeidentificationError(str(exc)) from exc
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not str(dataset.get(keyword, "") or "").strip():
            raise DeidentificationError(f"dataset lacks {keyword}")


def _check_kept_uids(dataset: Dataset, policy: DeidentificationPolicy) -> None:
    """InvalidUIDError for an invalid UID that de-identification would keep as it is."""
    problem = uid_problem(str(dataset.SOPClassUID).strip())
    if problem is not None:
        raise InvalidUIDError(f"SOPClassUID is not a valid UID: {problem}")
    if ProfileOption.RETAIN_UIDS not in policy.options:
        return  # every instance UID becomes a keyed 2.25 UID
    for element in dataset.iterall():
        if element.VR != "UI" or element.tag.is_private:
            continue
        row = policy.profile.row_for(int(element.tag))
        if row is None or row.options.get(ProfileOption.RETAIN_UIDS.value) != "K":
            continue
        for value in _values(element):
            text = (
                value.decode("ascii", "replace") if isinstance(value, bytes) else str(value or "")
            ).strip("\x00 ")
            problem = uid_problem(text) if text else None
            if problem is not None:
                raise InvalidUIDError(
                    f"{element.keyword or 'a UID attribute'} is not a valid UID and the Retain "
                    f"UIDs option keeps it as it is: {problem}"
                )


def _record_method(dataset: Dataset, options: frozenset[ProfileOption], masked: bool) -> None:
    codes = [BASIC_PROFILE_CODE]
    if masked:
        codes.append(CLEAN_PIXEL_DATA_CODE)
    codes += [OPTION_CODES[o] for o in sorted(options, key=lambda o: OPTION_CODES[o][0])]
    dataset.PatientIdentityRemoved = "YES"
    # LO, VM 1-n: one value per profile/option meaning (each fits in 64 characters).
    dataset.DeidentificationMethod = MultiValue(
        str, ["dicom-gateway PS3.15 E.1-1", *(c[1] for c in codes)]
    )
    dataset.DeidentificationMethodCodeSequence = Sequence([_code_item(c) for c in codes])
    if ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES in options:
        dataset.LongitudinalTemporalInformationModified = "MODIFIED"
    elif ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES in options:
        dataset.LongitudinalTemporalInformationModified = "UNMODIFIED"
    else:
        dataset.LongitudinalTemporalInformationModified = "REMOVED"


def _originals(before: dict[BaseTag, DataElement], after: Dataset) -> Dataset:
    originals = Dataset()
    for tag, element in before.items():
        if tag not in after or after[tag] != element:
            originals.add(element)
    return originals


def deidentify(
    dataset: Dataset, policy: DeidentificationPolicy, *, domain: DomainIdentity | None = None
) -> DeidentificationResult:
    """De-identify `dataset` in place and return its new identifiers.

    With `domain`, the dataset is an object written back into a stored study of this
    pseudonymization domain: it takes the study's identity (`DomainIdentity`), keeps its
    UIDs, and is cleaned of anything else identifying by the same profile (plus Clean
    Structured Content and Clean Descriptors, so a report's content stays, cleaned).

    Raises DeidentificationError when the dataset lacks Study/Series/SOP Instance UIDs,
    InvalidUIDError (a DeidentificationError) when a UID it would keep as it is (the SOP
    Class UID, any UID under Retain UIDs) is invalid, and BurnedInAnnotationRisk when its
    pixels may show identity and no mask applies.
    """
    _check_identifiers(dataset)
    if domain is not None:  # its originals are pseudonyms: nothing to encrypt for re-identification
        policy = replace(
            policy,
            options=policy.options | DOMAIN_OPTIONS,
            recipient_certificate=None,
            cleaned_descriptors=None,
        )
    _check_kept_uids(dataset, policy)
    masked = False
    risk = policy.pixel_policy.risk(dataset)
    if risk is not None:
        mask = policy.pixel_policy.mask_for(dataset)
        if mask is None:
            raise BurnedInAnnotationRisk(f"{risk}, and no pixel mask is configured for it")
    snapshot: dict[BaseTag, DataElement] | None = None
    if policy.recipient_certificate is not None:
        snapshot = {t: copy.deepcopy(dataset[t]) for t in dataset.keys() if int(t) != 0x7FE00010}
    if risk is not None and mask is not None:
        apply_mask(dataset, mask)
        masked = True
    worker = _Deidentifier(policy, dataset, domain)
    worker.walk(dataset, (), _Mode.NORMAL)
    if "PatientID" not in dataset:  # Type 2: present, and a pseudonym like any other
        dataset.PatientID = (
            domain.patient_id if domain is not None else worker.keys.patient_id(worker.patient_key)
        )
    if "PatientName" not in dataset:
        dataset.PatientName = (
            domain.patient_name
            if domain is not None
            else worker.keys.patient_name(worker.patient_key)
        )
    if domain is not None and "AccessionNumber" not in dataset:
        dataset.AccessionNumber = domain.accession_number
    _record_method(dataset, worker.options, masked)
    if snapshot is not None and policy.recipient_certificate is not None:
        item = encrypted_attributes_item(
            _originals(snapshot, dataset), policy.recipient_certificate
        )
        dataset.EncryptedAttributesSequence = Sequence([item])
    dataset.preamble = b"\x00" * 128  # a vendor or TIFF preamble can carry anything
    file_meta = getattr(dataset, "file_meta", None)
    if file_meta is not None:
        file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        for tag in [t for t in file_meta.keys() if t.is_private or int(t) in _META_TAGS_TO_REMOVE]:
            del file_meta[tag]
    return DeidentificationResult(
        patient_id=str(dataset.PatientID),
        study_instance_uid=str(dataset.StudyInstanceUID),
        series_instance_uid=str(dataset.SeriesInstanceUID),
        sop_instance_uid=str(dataset.SOPInstanceUID),
        masked=masked,
        local_patient_id=worker.keys.patient_id(worker.local_key) if worker.local_key else "",
    )
