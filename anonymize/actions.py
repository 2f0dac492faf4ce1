"""Apply the confidentiality profile to a dataset: pure functions, no I/O.

This is the first cut of the PS3.15 Basic Profile with the Retain Longitudinal Temporal
Information with Modified Dates option: every tag of Table E.1-1 gets its action, the
compound actions are resolved conservatively (keep a dummy or an empty value rather than
remove, so Type 1/2 attributes stay present), private and repeating-group (curve,
overlay) attributes are removed, UIDs are remapped with keyed HMAC, and the identifying
values that make a study findable again (patient, accession) become keyed pseudonyms.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from anonymize.keys import PseudonymKeys
from anonymize.profile import Action, ConfidentialityProfile, ProfileRow, load_profile

# ANS (Agence du Numérique en Santé) OIDs of the INS: NIR, NIA, and their test twins.
DEFAULT_INS_ISSUER_OIDS = frozenset(
    {"1.2.250.1.213.1.4.8", "1.2.250.1.213.1.4.9", "1.2.250.1.213.1.4.10", "1.2.250.1.213.1.4.11"}
)

_TAG_PATIENT_NAME = 0x00100010
_TAG_PATIENT_ID = 0x00100020
_TAG_ACCESSION_NUMBER = 0x00080050
_DATE_FORMAT = "%Y%m%d"
_DUMMY_TEXT = "ANONYMIZED"
_DUMMY_BY_VR: dict[str, object] = {
    "PN": "ANONYMOUS", "LO": _DUMMY_TEXT, "SH": _DUMMY_TEXT, "LT": _DUMMY_TEXT,
    "ST": _DUMMY_TEXT, "UT": _DUMMY_TEXT, "UC": _DUMMY_TEXT, "CS": "ANONYMIZED",
    "AE": "ANONYMOUS", "DA": "19000101", "TM": "000000", "DT": "19000101000000",
    "AS": "000D", "IS": "0", "DS": "0", "US": 0, "SS": 0, "UL": 0, "SL": 0,
    "FL": 0.0, "FD": 0.0, "UV": 0, "SV": 0,
}

BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
MODIFIED_DATES_CODE = ("113107", "DCM", "Retain Longitudinal Temporal Information Modified Dates Option")


class DeidentificationError(ValueError):
    """The dataset cannot be de-identified (e.g. it lacks the UIDs that identify it)."""


@dataclass(frozen=True)
class DeidentificationPolicy:
    """What a pseudonymization domain decides: its keys, the site, the options in force."""

    keys: PseudonymKeys
    site_id: str
    ins_issuer_oids: frozenset[str] = DEFAULT_INS_ISSUER_OIDS
    retain_modified_dates: bool = True
    profile: ConfidentialityProfile = field(default_factory=load_profile)


@dataclass(frozen=True)
class DeidentificationResult:
    """The de-identified identifiers of the instance (no original value is carried)."""

    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str


def _issuer_of(item: Dataset) -> str:
    issuer = str(item.get("IssuerOfPatientID", "") or "").strip()
    if not issuer:
        for qualifier in item.get("IssuerOfPatientIDQualifiersSequence", []) or []:
            issuer = str(qualifier.get("UniversalEntityID", "") or "").strip()
            if issuer:
                break
    return issuer


def patient_key(dataset: Dataset, site_id: str, ins_issuer_oids: frozenset[str]) -> str:
    """The identity a patient pseudonym derives from.

    The national health identifier (INS) when the dataset carries it, in PatientID with an
    INS issuer or in OtherPatientIDsSequence, so two sites link one patient; otherwise the
    local PatientID qualified by its issuer (or, without one, by the site).
    """
    local_id = str(dataset.get("PatientID", "") or "").strip()
    issuer = _issuer_of(dataset)
    if local_id and issuer in ins_issuer_oids:
        return f"ins:{local_id}"
    for item in dataset.get("OtherPatientIDsSequence", []) or []:
        other_id = str(item.get("PatientID", "") or "").strip()
        if other_id and _issuer_of(item) in ins_issuer_oids:
            return f"ins:{other_id}"
    return f"local:{issuer or 'site:' + site_id}:{local_id}"


def accession_qualifier(dataset: Dataset, site_id: str) -> str:
    """The namespace an accession number is unique in: its issuer, or the site."""
    for item in dataset.get("IssuerOfAccessionNumberSequence", []) or []:
        for keyword in ("UniversalEntityID", "LocalNamespaceEntityID"):
            value = str(item.get(keyword, "") or "").strip()
            if value:
                return value
    return f"site:{site_id}"


def _shift_date(value: str, days: int) -> str | None:
    try:
        shifted = dt.datetime.strptime(value[:8], _DATE_FORMAT) - dt.timedelta(days=days)
    except ValueError:
        return None
    return shifted.strftime(_DATE_FORMAT) + value[8:]


class _Deidentifier:
    def __init__(self, policy: DeidentificationPolicy, dataset: Dataset) -> None:
        self.policy = policy
        self.keys = policy.keys
        self.patient_key = patient_key(dataset, policy.site_id, policy.ins_issuer_oids)
        self.shift_days = self.keys.date_shift_days(self.patient_key)
        self.accession_qualifier = accession_qualifier(dataset, policy.site_id)
        self.overrides: dict[int, Callable[[DataElement], None]] = {
            _TAG_PATIENT_NAME: self._set(self.keys.patient_name(self.patient_key)),
            _TAG_PATIENT_ID: self._set(self.keys.patient_id(self.patient_key)),
            _TAG_ACCESSION_NUMBER: self._accession,
        }

    @staticmethod
    def _set(value: str) -> Callable[[DataElement], None]:
        def apply(element: DataElement) -> None:
            element.value = value
        return apply

    def _accession(self, element: DataElement) -> None:
        original = str(element.value or "").strip()
        element.value = (
            self.keys.accession_number(original, self.accession_qualifier) if original else ""
        )

    def walk(self, dataset: Dataset, top_level: bool) -> None:
        for tag in list(dataset.keys()):
            element = dataset[tag]
            if tag.is_private:
                del dataset[tag]
                continue
            override = self.overrides.get(int(tag)) if top_level else None
            if override is not None:
                override(element)
                continue
            row = self.policy.profile.row_for(int(tag))
            if row is None:
                if element.VR == "SQ":
                    self._recurse(element)
                continue
            self._apply(dataset, element, row)

    def _recurse(self, element: DataElement) -> None:
        for item in element.value or []:
            self.walk(item, top_level=False)

    def _apply(self, dataset: Dataset, element: DataElement, row: ProfileRow) -> None:
        if (
            self.policy.retain_modified_dates
            and row.options.get("rtnLongModifDatesOpt") == "C"
            and element.VR in ("DA", "DT", "TM")
        ):
            self._shift(element)
            return
        action = row.basic
        if action is Action.REMOVE:
            del dataset[element.tag]
        elif action is Action.KEEP:
            if element.VR == "SQ":
                self._recurse(element)
        elif action is Action.UID:
            self._remap_uid(element)
        elif action is Action.REMOVE_ZERO_OR_UID:
            if element.VR == "SQ":
                self._recurse(element)
            else:
                self._zero(element)
        elif action in (Action.ZERO, Action.REMOVE_OR_ZERO):
            self._zero(element)
        else:  # D, C, X/D, Z/D, X/Z/D: keep the attribute present with a dummy value
            self._dummy(element)

    def _shift(self, element: DataElement) -> None:
        if element.VR == "TM" or element.value in (None, ""):
            return
        values = list(element.value) if element.VM > 1 else [element.value]
        shifted = [_shift_date(str(v), self.shift_days) for v in values]
        if any(v is None for v in shifted):
            self._dummy(element)  # an unparseable date cannot be shifted safely
            return
        element.value = shifted if len(shifted) > 1 else shifted[0]

    def _remap_uid(self, element: DataElement) -> None:
        if element.VR != "UI" or element.value in (None, ""):
            if element.VR == "SQ":
                self._recurse(element)
            return
        values = list(element.value) if element.VM > 1 else [element.value]
        mapped = [self.keys.uid(str(v)) for v in values if str(v)]
        element.value = mapped if len(mapped) > 1 else (mapped[0] if mapped else "")

    @staticmethod
    def _zero(element: DataElement) -> None:
        element.value = Sequence() if element.VR == "SQ" else None

    def _dummy(self, element: DataElement) -> None:
        if element.VR == "SQ":
            element.value = Sequence()
        elif element.VR == "UI":
            self._remap_uid(element)
        elif element.VR in _DUMMY_BY_VR:
            element.value = _DUMMY_BY_VR[element.VR]
        else:  # OB, OW, UN, AT, UR...: no meaningful dummy, empty it
            element.value = None


def _code_item(code: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def deidentify(dataset: Dataset, policy: DeidentificationPolicy) -> DeidentificationResult:
    """De-identify `dataset` in place and return its new identifiers.

    Raises DeidentificationError when the dataset lacks Study/Series/SOP Instance UIDs.
    """
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not str(dataset.get(keyword, "") or "").strip():
            raise DeidentificationError(f"dataset lacks {keyword}")
    worker = _Deidentifier(policy, dataset)
    worker.walk(dataset, top_level=True)
    dataset.PatientIdentityRemoved = "YES"
    codes = [BASIC_PROFILE_CODE]
    if policy.retain_modified_dates:
        codes.append(MODIFIED_DATES_CODE)
        dataset.LongitudinalTemporalInformationModified = "MODIFIED"
    method = "PS3.15 Basic Profile" + (" + Modified Dates" if policy.retain_modified_dates else "")
    dataset.DeidentificationMethod = f"dicom-gateway {method}"
    dataset.DeidentificationMethodCodeSequence = Sequence([_code_item(c) for c in codes])
    file_meta = getattr(dataset, "file_meta", None)
    if file_meta is not None:
        file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        for tag in [t for t in file_meta.keys() if t.is_private or int(t) == 0x00020100]:  # noqa: SIM118
            del file_meta[tag]
    return DeidentificationResult(
        patient_id=str(dataset.PatientID),
        study_instance_uid=str(dataset.StudyInstanceUID),
        series_instance_uid=str(dataset.SeriesInstanceUID),
        sop_instance_uid=str(dataset.SOPInstanceUID),
    )
