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
_UNSPACED = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")

#: Attributes whose values are identifying wherever they reappear in free text.
_IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "OperatorsName",
    "RequestingPhysician",
    "StationName",
    "DeviceSerialNumber",
    "MedicalRecordLocator",
    "IssuerOfPatientID",
    "StudyID",
)
_MONTHS = (
    "january|february|march|april|may|june|july|august|september|october|november|december|"
    "jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec|"
    "janvier|février|fevrier|mars|avril|mai|juin|juillet|août|aout|septembre|octobre|"
    "novembre|décembre|decembre|janv|févr|fevr|avr|juil|déc"
)
_GENERIC_PATTERNS = (
    re.compile(
        rf"\b\d{{1,2}}(?:st|nd|rd|th|er)?\.?\s+(?:{_MONTHS})\.?,?\s+\d{{2,4}}\b", re.IGNORECASE
    ),
    re.compile(rf"\b(?:{_MONTHS})\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{2,4}}\b", re.IGNORECASE),
    re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+"),  # e-mail
    re.compile(r"\b\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4}\b"),  # 12/03/1984
    re.compile(r"\b(?:19|20)\d{2}[-/.]?\d{2}[-/.]?\d{2}\b"),  # 19840312, 1984-03-12
    re.compile(r"(?:\+?\d[\s.-]?){8,}\d"),  # phone numbers, INS/NIR, long IDs
)
_MIN_TOKEN = 2
_ID_SUFFIXES = ("ID", "IDs", "Number", "Numbers")
#: Values that are not identity (dummies and generic words an identifier field may hold).
_NOT_IDENTIFYING = frozenset({"ANONYMOUS", "ANONYMIZED", "UNKNOWN", "NONE", "NA", "N/A"})


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
    return [
        date,
        f"{year}-{month}-{day}",
        f"{day}/{month}/{year}",
        f"{day}.{month}.{year}",
        f"{day}-{month}-{year}",
        f"{month}/{day}/{year}",
    ]


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
        for element in dataset.iterall():  # names and identifiers at any depth
            keyword = element.keyword or ""
            if element.VR == "PN" or (
                element.VR in ("LO", "SH") and keyword.endswith(_ID_SUFFIXES)
            ):
                for value in _values(element.value):
                    value = value.strip()
                    if len(value) >= _MIN_TOKEN and value.upper() not in _NOT_IDENTIFYING:
                        tokens.add(value)
                        if element.VR == "PN":
                            tokens.update(_name_parts(value))
        for value in _values(dataset.get("PatientBirthDate")):
            tokens.update(_date_spellings(value.strip()))
        self._tokens = sorted((t for t in tokens if t), key=len, reverse=True)
        self._pattern: re.Pattern[str] | None = None  # compiled on first use

    def clean(self, text: str) -> str:
        """`text` with every identifying value replaced by '*' runs of the same length."""
        if self._pattern is None and self._tokens:
            # Whole words only: a surname "LE" must not eat the "LE" of "LEFT". Scripts
            # written without spaces (CJK) have no word boundaries: matched anywhere.
            spaced = [re.escape(t) for t in self._tokens if not _UNSPACED.search(t)]
            unspaced = [re.escape(t) for t in self._tokens if _UNSPACED.search(t)]
            parts = []
            if spaced:
                parts.append(rf"(?<![^\W_])(?:{'|'.join(spaced)})(?![^\W_])")
            if unspaced:
                parts.append(f"(?:{'|'.join(unspaced)})")
            self._pattern = re.compile("|".join(parts), re.IGNORECASE)
        if self._pattern is not None:
            text = self._pattern.sub(lambda m: REDACTED * len(m.group(0)), text)
        for pattern in _GENERIC_PATTERNS:
            text = pattern.sub(lambda m: REDACTED * len(m.group(0)), text)
        return text
