"""Library log records and warnings never carry a value into a site's logs.

pydicom reports invalid values by quoting them ("Invalid value for VR UI: '1.2.…'"), as a
log record and as a warning; pynetdicom dumps whole data sets at DEBUG and its exception
records carry tracebacks. At a site these are original identifiers, read before
de-identification. Every record of these libraries keeps its logger, level and (for an
exception) the exception's type; its text is replaced. Warnings go to the log (not to
stderr) as their category and where they were raised, without their text.
"""

from __future__ import annotations

import logging
import re
from typing import Any

#: Loggers (and their children) whose messages may quote data element values.
VALUE_QUOTING_LIBRARIES = ("pydicom", "pynetdicom")
WARNINGS_LOGGER = "py.warnings"
#: `logging.captureWarnings` logs "<file>:<line>: <Category>: <text>".
_CAPTURED_WARNING = re.compile(r"^(?P<file>.+?):(?P<line>\d+): (?P<category>\w+): ")


def _library(name: str) -> bool:
    return name.partition(".")[0] in VALUE_QUOTING_LIBRARIES


def _value_free(record: logging.LogRecord) -> None:
    """Replace the text of a library's record (or of a captured warning) in place."""
    if record.name == WARNINGS_LOGGER:
        text = record.getMessage()
        found = _CAPTURED_WARNING.match(text)
        record.msg = "%s raised at %s:%s (text withheld: it may quote data element values)"
        record.args = (
            (found["category"], "/".join(found["file"].split("/")[-2:]), found["line"])
            if found
            else ("a warning", "?", "?")
        )
    else:
        record.msg = "%s %s (text withheld: it may quote data element values)%s"
        exception = record.exc_info[1] if record.exc_info else None
        record.args = (
            record.name,
            record.levelname.lower(),
            f"; {type(exception).__name__}" if exception is not None else "",
        )
    record.exc_info, record.exc_text, record.stack_info = None, None, None


class _ValueFreeRecords:
    """A log record factory: a filter on a logger misses its children's records, and one
    on a handler is lost when a library replaces the handlers; every record is made here."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record: logging.LogRecord = self.previous(*args, **kwargs)
        if _library(record.name) or record.name == WARNINGS_LOGGER:
            _value_free(record)
        return record


def withhold_library_values() -> None:
    """Install for this process (idempotent): library records and warnings without values."""
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _ValueFreeRecords):
        logging.setLogRecordFactory(_ValueFreeRecords(factory))
    logging.captureWarnings(True)


__all__ = ["VALUE_QUOTING_LIBRARIES", "withhold_library_values"]
