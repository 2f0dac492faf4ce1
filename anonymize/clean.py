"""'Clean' (action C) for free text: keep the text, redact what identifies.

A cleaned value keeps its clinical words and loses every identifying value the dataset
itself carries (patient names, IDs, birth date in several spellings, accession number,
institution, staff names, addresses, phone numbers) plus generic patterns (dates, long
digit runs such as national identifiers or phone numbers, e-mail addresses).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

REDACTED = "*"

#: Attributes whose values are identifying wherever they reappear in free text.
_IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "AccessionNumber",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "ReferringPhysicianName", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord", "OperatorsName", "RequestingPhysician", "StationName",
    "DeviceSerialNumber", "MedicalRecordLocator", "IssuerOfPatientID", "StudyID",
)
_GENERIC_PATTERNS = (
    re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+"),  # e-mail
    re.compile(r"\b\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4}\b"),  # 12/03/1984
    re.compile(r"\b(?:19|20)\d{2}[-/.]?\d{2}[-/.]?\d{2}\b"),  # 19840312, 1984-03-12
    re.compile(r"(?:\+?\d[\s.-]?){8,}\d"),  # phone numbers, INS/NIR, long IDs
)
_MIN_TOKEN = 2


def _values(value: object) -> Iterable[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple | MultiValue):
        return [str(v) for v in value]
    return [str(value)]


def _name_parts(text: str) -> list[str]:
    return [p for p in re.split(r"[\^=\s,]+", text) if len(p) >= _MIN_TOKEN]


def _date_spellings(date: str) -> list[str]:
    if len(date) != 8 or not date.isdigit():
        return [date] if date else []
    year, month, day = date[:4], date[4:6], date[6:8]
    return [date, f"{year}-{month}-{day}", f"{day}/{month}/{year}", f"{day}.{month}.{year}",
            f"{day}-{month}-{year}", f"{month}/{day}/{year}"]


class TextCleaner:
    """Redacts a dataset's own identifying values, and generic identifier patterns, from text."""

    def __init__(self, dataset: Dataset) -> None:
        tokens: set[str] = set()
        for keyword in _IDENTIFYING_KEYWORDS:
            for value in _values(dataset.get(keyword)):
                value = value.strip()
                if len(value) >= _MIN_TOKEN:
                    tokens.add(value)
                    tokens.update(_name_parts(value))
        for item in dataset.get("OtherPatientIDsSequence", []) or []:
            for value in _values(item.get("PatientID")):
                if len(value.strip()) >= _MIN_TOKEN:
                    tokens.add(value.strip())
        for value in _values(dataset.get("PatientBirthDate")):
            tokens.update(_date_spellings(value.strip()))
        self._tokens = sorted((t for t in tokens if t), key=len, reverse=True)
        self._pattern: re.Pattern[str] | None = None  # compiled on first use

    def clean(self, text: str) -> str:
        """`text` with every identifying value replaced by '*' runs of the same length."""
        if self._pattern is None and self._tokens:
            # Whole words only: a surname "LE" must not eat the "LE" of "LEFT".
            alternatives = "|".join(re.escape(t) for t in self._tokens)
            self._pattern = re.compile(rf"(?<![^\W_])(?:{alternatives})(?![^\W_])", re.IGNORECASE)
        if self._pattern is not None:
            text = self._pattern.sub(lambda m: REDACTED * len(m.group(0)), text)
        for pattern in _GENERIC_PATTERNS:
            text = pattern.sub(lambda m: REDACTED * len(m.group(0)), text)
        return text
