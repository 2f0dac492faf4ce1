"""What reading an untrusted data set can raise: pydicom reports corrupt input with many
exception types (struct.error for a mangled header, RecursionError for absurdly nested
sequences...). Every edge that parses input catches these and refuses the instance
(0xC000, a STOW failure, quarantine) instead of crashing or retrying a poison message."""

from __future__ import annotations

import struct

from pydicom.errors import InvalidDicomError

UNREADABLE_DATASET_ERRORS: tuple[type[Exception], ...] = (
    InvalidDicomError, ValueError, TypeError, KeyError, EOFError, OverflowError,
    AttributeError, NotImplementedError, IndexError, struct.error, RecursionError,
)

__all__ = ["UNREADABLE_DATASET_ERRORS"]
