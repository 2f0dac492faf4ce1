"""Reading and writing untrusted data sets: what reading one can raise, a check that none
of its values was cut short, and the Part 10 encoding every writer uses.

pydicom reports corrupt input with many exception types (struct.error for a mangled header,
RecursionError for absurdly nested sequences...). Every edge that parses input catches
`UNREADABLE_DATASET_ERRORS` and refuses the instance (0xC000, a STOW failure, quarantine)
instead of crashing or retrying a poison message."""

from __future__ import annotations

import re
import struct
from io import BytesIO

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

UNREADABLE_DATASET_ERRORS: tuple[type[Exception], ...] = (
    InvalidDicomError,
    ValueError,
    TypeError,
    KeyError,
    EOFError,
    OverflowError,
    AttributeError,
    NotImplementedError,
    IndexError,
    struct.error,
    RecursionError,
)
_UNDEFINED_LENGTH = 0xFFFFFFFF


class TruncatedDataSetError(ValueError):
    """An element declares more bytes than the data set holds."""


def check_complete(dataset: Dataset) -> None:
    """Refuse a truncated data set: pydicom silently shortens a value cut by end of file.

    Raises TruncatedDataSetError (a ValueError) naming the first truncated element.
    """
    for tag in list(dataset.keys()):
        raw = dataset.get_item(tag)
        if (
            isinstance(raw, RawDataElement)
            and raw.value is not None
            and raw.length != _UNDEFINED_LENGTH
            and len(raw.value) != raw.length
        ):
            raise TruncatedDataSetError(f"data set is truncated at element {tag}")


_UID_SHAPE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_uid_shaped(value: str) -> bool:
    """Digits and dots, at most 64 characters: what may name a spool file or a path
    segment. Received UIDs often break the standard's stricter rule (no leading zero in a
    component, pydicom's `UID.is_valid`), and are still accepted and stored; the
    de-identification checks the UIDs it keeps with pydicom's rule (`uid_problem`)."""
    return len(value) <= 64 and _UID_SHAPE.match(value) is not None


def text_of(dataset: Dataset, keyword: str, limit: int | None = None) -> str:
    """An attribute's value as text: "" when absent or empty, values of a multi-valued one
    joined by backslashes (as DICOM writes them), stripped, at most `limit` characters."""
    value = dataset.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        value = "\\".join(str(v) for v in value)
    return str(value).strip()[:limit]


def encode_dataset(dataset: Dataset) -> bytes:
    """Serialise a dataset as a DICOM Part 10 file."""
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


__all__ = [
    "UNREADABLE_DATASET_ERRORS",
    "TruncatedDataSetError",
    "check_complete",
    "encode_dataset",
    "is_uid_shaped",
    "text_of",
]
