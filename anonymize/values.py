"""Whether a value is a valid value of its attribute: per its VR (PS3.5 6.2), and per its
meaning where that narrows the VR (Timezone Offset From UTC is an SH written `&HHMM`).

A clean (C) action keeps only such values (PS3.15 E.1-1: "values of similar meaning known
not to contain identifying information"); the Retain UIDs option keeps only valid UIDs.
pydicom's VR validators do the VR checks; what they leave out for a stored value (ranges
are query syntax, calendar dates, the IS range, control characters in text) is added here.
Nothing here logs or quotes the value it judges.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from pydicom.multival import MultiValue
from pydicom.valuerep import DA, DT, TM, VALIDATORS

#: pydicom's VR validators: (vr, value) -> (valid, reason). Typed here: pydicom's table is not.
_Validator = Callable[[str, Any], tuple[bool, str]]
_VALIDATORS: dict[str, _Validator] = dict(VALIDATORS)

#: PS3.5 6.2: IS is a signed 32-bit integer written in decimal.
_IS_RANGE = (-(2**31), 2**31 - 1)
#: PS3.5 6.2 (DT) and PS3.3 C.12.1.1.8: UTC offsets run from -12:00 to +14:00.
_OFFSET = re.compile(r"([+-])(\d\d)([0-5]\d)")
_MIN_OFFSET_MINUTES, _MAX_OFFSET_MINUTES = -12 * 60, 14 * 60
#: PS3.5 6.1.2-6.1.3: text may hold ESC (character sets) and, in ST/LT/UT, format effectors.
_CONTROL = {
    "short": re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]"),
    "long": re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]"),
}
_LONG_TEXT_VRS = frozenset({"ST", "LT", "UT"})
_SHORT_TEXT_VRS = frozenset({"SH", "LO", "UC", "PN"})
_UID_MAX_LENGTH = 64
_BINARY_SIZES = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "UV": 8, "SV": 8, "AT": 4}
#: VRs whose values are written as characters (PS3.5 6.2).
CHARACTER_VRS = frozenset(
    {
        "AE",
        "AS",
        "CS",
        "DA",
        "DS",
        "DT",
        "IS",
        "LO",
        "LT",
        "PN",
        "SH",
        "ST",
        "TM",
        "UC",
        "UI",
        "UR",
        "UT",
    }
)


def _offset_minutes(text: str) -> int | None:
    match = _OFFSET.fullmatch(text)
    if match is None:
        return None
    sign, hours, minutes = match.groups()
    total = int(hours) * 60 + int(minutes)
    return -total if sign == "-" else total


def valid_utc_offset(text: str) -> bool:
    """`&HHMM` (& is + or -) between -1200 and +1400: a Timezone Offset From UTC."""
    minutes = _offset_minutes(text)
    return minutes is not None and _MIN_OFFSET_MINUTES <= minutes <= _MAX_OFFSET_MINUTES


#: Attributes whose meaning narrows their VR: keyword -> check of one value.
_MEANING_CHECKS: dict[str, Callable[[str], bool]] = {"TimezoneOffsetFromUTC": valid_utc_offset}


def _parses(kind: type, text: str) -> bool:
    try:
        kind(text)
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def _valid_dt(text: str) -> bool:
    if not _parses(DT, text):
        return False
    body, offset = text, ""
    match = re.search(r"[+-]\d{4}$", text)
    if match is not None and match.start() >= 4:  # a trailing &ZZXX is the UTC offset
        body, offset = text[: match.start()], match.group(0)
    # any other sign is a range (query syntax, never a stored value)
    return "-" not in body and "+" not in body and (not offset or valid_utc_offset(offset))


def _valid_is(text: str) -> bool:
    try:
        number = int(text.strip())
    except ValueError:
        return False
    return _IS_RANGE[0] <= number <= _IS_RANGE[1]


def _valid_one(vr: str, value: Any) -> bool:
    """One value (never a multi-value) against its VR."""
    if isinstance(value, bytes | bytearray) and vr in _BINARY_SIZES:
        return len(value) % _BINARY_SIZES[vr] == 0  # undecoded (implicit VR): whole numbers
    if isinstance(value, bytes | bytearray) and vr in CHARACTER_VRS:
        try:
            value = bytes(value).decode("ascii")  # undecoded text: judged as characters
        except UnicodeDecodeError:
            return False
    elif vr in CHARACTER_VRS and not isinstance(value, str):
        # pydicom reads IS/DS as numbers, PN as PersonName: judge what was written
        value = getattr(value, "original_string", None) or str(value)
    validator = _VALIDATORS.get(vr)
    if validator is not None:
        valid, _ = validator(vr, value)  # returns its reason; never logs it
        if not valid:
            return False
    if not isinstance(value, str):
        return True
    if vr == "DA":
        return _parses(DA, value)  # no range ('-'), a real calendar date
    if vr == "TM":
        return "-" not in value and _parses(TM, value)
    if vr == "DT":
        return _valid_dt(value)
    if vr == "IS":
        return _valid_is(value)
    if vr == "AE":
        return value.strip() != "" and "\\" not in value
    if vr in _SHORT_TEXT_VRS:
        return _CONTROL["short"].search(value) is None
    if vr in _LONG_TEXT_VRS:
        return _CONTROL["long"].search(value) is None
    return True


def _each(value: Any) -> Iterable[Any]:
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def valid_value(vr: str, value: Any, keyword: str = "") -> bool:
    """Whether `value` (one value or a multi-value) is valid for an attribute of `vr`, and
    for the meaning of `keyword` when the standard narrows it. An empty value is valid."""
    if value is None or value == "" or value == b"":
        return True
    meaning = _MEANING_CHECKS.get(keyword)
    for one in _each(value):
        if one is None or one == "":
            continue
        if not _valid_one(vr, one):
            return False
        if meaning is not None and not meaning(str(one)):
            return False
    return True


def uid_problem(uid: str) -> str | None:
    """What makes `uid` invalid (PS3.5 9.1), in words that do not quote it; None if valid."""
    if not uid:
        return "it is empty"
    if _VALIDATORS["UI"]("UI", uid)[0]:
        return None
    if len(uid) > _UID_MAX_LENGTH:
        return f"it is longer than {_UID_MAX_LENGTH} characters"
    if any(ch not in "0123456789." for ch in uid):
        return "it holds characters other than digits and dots"
    if any(component == "" for component in uid.split(".")):
        return "it has an empty component"
    return "a component has a leading zero"
