"""Clean (C) keeps only valid values: every C cell of PS3.15 Table E.1-1 (row x option),
with a valid value (cleaned as before) and an invalid one (never kept).

Expectations come from the table and the standard's VR rules (PS3.5 6.2), checked with
pydicom's own validators, never from the engine's output.
"""

from __future__ import annotations

import datetime as dt
import re
import warnings
from collections.abc import Iterator

import pydicom
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.valuerep import DA, DT, TM, VALIDATORS

from anonymize import (
    DeidentificationPolicy,
    InsIssuers,
    ProfileOption,
    PseudonymKeys,
    deidentify,
    load_profile,
    patient_key,
    valid_value,
)
from anonymize.profile import ProfileRow
from gateway.sample_study import SampleStudySpec, build_sample_study

SECRET = b"clean-values-test-secret-0123456789ab"
SITE = "site-a"
_PRIVATE_DLP = 0x00E11021  # ELSCINT1 "DLP", DS: on the Safe Private list (PS3.15 E.3.10-1)
_MODIFIED_DATES = ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES
_BINARY = ("OB", "OW", "UN")
#: Per VR: a valid value without identity, and an invalid one (PS3.5 6.2).
_VALUES: dict[str, tuple[object, object]] = {
    "DA": ("20200315", "20201345"),  # month 13
    "DT": ("20200315101112", "20200315251112"),  # hour 25
    "TM": ("101112", "251112"),
    "LO": ("left knee, lateral view", "left knee\x01lateral"),  # control character
    "SH": ("LEFT KNEE", "x" * 17),  # longer than 16
    "ST": ("no acute findings", "no acute\x00findings"),
    "LT": ("no acute findings", "no acute\x07findings"),
    "UT": ("no acute findings", "no acute\x1ffindings"),
    "CS": ("COERCE", "coerce"),  # lower case is not a CS character
    "AE": ("STATION1", "\x01STATION"),
    "OB": (b"\x01\x02\x03\x04", None),  # every byte string is a valid OB value
    "OW": (b"\x01\x02\x03\x04", None),
}
#: Attributes whose meaning narrows their VR: (valid, invalid).
_MEANING_VALUES: dict[str, tuple[object, object]] = {
    "TimezoneOffsetFromUTC": ("+0100", "0100"),  # &HHMM: the sign is required
}


def _clean_cells() -> Iterator[tuple[int, ProfileRow, ProfileOption]]:
    """Every (tag, row, option) of the table where the option's action is C; a repeating
    group by its first member, the private row by a Safe Private attribute."""
    profile = load_profile()
    rows = sorted(profile.rows.items())
    for mask, value, row in profile.masked_rows:
        concrete = value | 0x00020000
        rows.append((concrete | 0x3000 if concrete & 0xFFFF == 0 else concrete, row))
    rows.append((_PRIVATE_DLP, profile.private_row))
    for tag, row in rows:
        for option in ProfileOption:
            if row.options.get(option.value) == "C":
                yield tag, row, option


CELLS = list(_clean_cells())


def _vr(tag: int) -> str:
    if tag == _PRIVATE_DLP:
        return "DS"
    vr = str(dictionary_VR(tag))  # KeyError: a C row pydicom does not know fails loudly
    return "OW" if vr == "OB or OW" else vr.split(" or ")[0]


def _code_item(meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-15750", "SRT", meaning
    return item


def _instance(tag: int, vr: str, value: object) -> Dataset:
    dataset = build_sample_study(SampleStudySpec(ct_slices=1, mr_slices=0, ct_size=8))[0]
    if tag == _PRIVATE_DLP:
        dataset.private_block(0x00E1, "ELSCINT1", create=True)
    if vr == "SQ":
        value = Sequence([_code_item(str(value))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns while an invalid value is planted
        dataset.add(DataElement(tag, vr, value))
    return dataset


def _deidentified(dataset: Dataset, option: ProfileOption) -> tuple[Dataset, int]:
    """The dataset de-identified with `option` alone, and the days its dates move back."""
    policy = DeidentificationPolicy(PseudonymKeys(SECRET), SITE, options=frozenset({option}),
                                    cleaned_descriptors=None)
    shift_days = PseudonymKeys(SECRET).date_shift_days(
        patient_key(dataset, SITE, InsIssuers()))
    deidentify(dataset, policy)
    return dataset, shift_days


def _shifted(date: str, days: int) -> str:
    return (dt.datetime.strptime(date, "%Y%m%d") - dt.timedelta(days=days)).strftime("%Y%m%d")


def _pair(tag: int, vr: str) -> tuple[object, object]:
    keyword = pydicom.datadict.keyword_for_tag(tag)
    if keyword in _MEANING_VALUES:
        return _MEANING_VALUES[keyword]
    if tag == _PRIVATE_DLP:
        return "123.4", "1234567890.1234567"  # a DS holds at most 16 characters
    if vr == "SQ":
        return "Knee joint", "Knee\x01joint"  # the item's Code Meaning (LO)
    return _VALUES[vr]


def _expected_when_valid(tag: int, vr: str, option: ProfileOption, value: object,
                         shift_days: int) -> object:
    """What C made of a valid value before values were checked: the value kept (text with
    nothing identifying, codes, numbers, overlays under Clean Graphics, times and offsets under
    Modified Dates), dates shifted, or — binary and AE values, which cannot be cleaned — the
    Basic Profile action (`BASIC`)."""
    if option is _MODIFIED_DATES:
        if vr == "DA":
            return _shifted(str(value), shift_days)
        if vr == "DT":
            return _shifted(str(value)[:8], shift_days) + str(value)[8:]
        if vr in ("TM", "SH"):
            return value
        return BASIC
    if option is ProfileOption.CLEAN_GRAPHICS and tag >> 24 == 0x60:
        return value
    if vr in (*_BINARY, "AE"):
        return BASIC
    return value


BASIC = object()


def _value_at(dataset: Dataset, tag: int) -> object:
    if tag not in dataset:
        return None
    value = dataset[tag].value
    if dataset[tag].VR == "SQ":
        return [str(item.get("CodeMeaning", "")) for item in value] if value else None
    return value


@pytest.mark.parametrize(("tag", "row", "option"), CELLS,
                         ids=[f"{t:08X}-{o.name.lower()}" for t, _, o in CELLS])
def test_a_valid_value_is_cleaned_as_before(tag: int, row: ProfileRow, option: ProfileOption) -> None:
    vr = _vr(tag)
    valid, _invalid = _pair(tag, vr)
    dataset, shift_days = _deidentified(_instance(tag, vr, valid), option)
    expected = _expected_when_valid(tag, vr, option, valid, shift_days)
    found = _value_at(dataset, tag)
    if expected is BASIC:  # the Basic Profile action: never the value as it was
        assert found != valid, row.name
    elif vr == "SQ":
        assert found == [valid], row.name
    else:
        assert found == expected, row.name


#: Cells whose VR has invalid values at all (every byte string is a valid OB or OW value).
INVALIDATABLE = [cell for cell in CELLS if _pair(cell[0], _vr(cell[0]))[1] is not None]


@pytest.mark.parametrize(("tag", "row", "option"), INVALIDATABLE,
                         ids=[f"{t:08X}-{o.name.lower()}" for t, _, o in INVALIDATABLE])
def test_an_invalid_value_is_never_kept(tag: int, row: ProfileRow, option: ProfileOption) -> None:
    vr = _vr(tag)
    _valid, invalid = _pair(tag, vr)
    dataset, _ = _deidentified(_instance(tag, vr, invalid), option)
    found = _value_at(dataset, tag)
    if vr == "SQ":  # the item stays (the sequence is cleaned); its invalid value does not
        meanings = found or []
        assert str(invalid) not in meanings, row.name
        assert all(VALIDATORS["LO"]("LO", m)[0] and "\x01" not in m for m in meanings)
        return
    assert found != invalid, row.name
    if found not in (None, "", b""):  # emptied or removed, or a dummy valid for the VR
        assert VALIDATORS[vr](vr, found)[0], row.name
        if vr == "DA":
            DA(str(found))
        elif vr == "TM":
            TM(str(found))
        elif vr == "DT":
            DT(str(found))
        keyword = pydicom.datadict.keyword_for_tag(tag)
        if keyword == "TimezoneOffsetFromUTC":
            assert re.fullmatch(r"[+-]\d{4}", str(found))


def test_every_row_and_option_that_cleans_is_covered() -> None:
    profile = load_profile()
    rows = [*profile.rows.values(), *(row for _, _, row in profile.masked_rows),
            profile.private_row]
    cleaning = [(row.tag, option) for row in rows for option in ProfileOption
                if row.options.get(option.value) == "C"]
    assert sorted(cleaning) == sorted((row.tag, option) for _, row, option in CELLS)
    assert {option for _, option in cleaning} == {
        ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES, ProfileOption.RETAIN_DEVICE_IDENTITY,
        ProfileOption.RETAIN_PATIENT_CHARACTERISTICS, ProfileOption.CLEAN_DESCRIPTORS,
        ProfileOption.CLEAN_STRUCTURED_CONTENT, ProfileOption.CLEAN_GRAPHICS,
        ProfileOption.RETAIN_SAFE_PRIVATE}


def test_an_invalid_timezone_offset_is_removed_under_modified_dates() -> None:
    """PS3.3 C.12.1.1.8: Timezone Offset From UTC is "&ZZXX"; Type 3 in the CT IOD."""
    dataset = build_sample_study(SampleStudySpec(ct_slices=1, mr_slices=0, ct_size=8))[0]
    dataset.TimezoneOffsetFromUTC = "UTC+1"
    _deidentified(dataset, _MODIFIED_DATES)
    assert "TimezoneOffsetFromUTC" not in dataset


def test_a_date_range_is_not_half_shifted() -> None:
    """A range is query syntax, not a stored DA: shifting its start would keep its end."""
    dataset = build_sample_study(SampleStudySpec(ct_slices=1, mr_slices=0, ct_size=8))[0]
    dataset.AcquisitionDate = "20200101-20200301"
    _deidentified(dataset, _MODIFIED_DATES)
    assert "20200301" not in str(dataset.get("AcquisitionDate", ""))


@pytest.mark.parametrize(("vr", "value", "keyword", "valid"), [
    ("DA", "20240229", "", True), ("DA", "20230229", "", False),  # 2023 is no leap year
    ("DA", "2023-01-01", "", False), ("DA", "20230101-20230201", "", False),
    ("TM", "235960", "", True), ("TM", "1200", "", True), ("TM", "12:00", "", False),
    ("TM", "120000-130000", "", False),
    ("DT", "2023", "", True), ("DT", "20230101120000.5+0100", "", True),
    ("DT", "20230101120000-1300", "", False), ("DT", "2023-2024", "", False),
    ("AS", "045Y", "", True), ("AS", "45Y", "", False), ("AS", "045A", "", False),
    ("IS", "2147483647", "", True), ("IS", "2147483648", "", False), ("IS", "1.5", "", False),
    ("DS", "-1.5e3", "", True), ("DS", "1,5", "", False), ("DS", "12345678901234567", "", False),
    ("US", 65535, "", True), ("US", 65536, "", False),
    ("SH", "+1400", "TimezoneOffsetFromUTC", True), ("SH", "-1200", "TimezoneOffsetFromUTC", True),
    ("SH", "-1300", "TimezoneOffsetFromUTC", False), ("SH", "+0160", "TimezoneOffsetFromUTC", False),
    ("LT", "line one\r\nline two", "", True), ("LO", "line one\r\nline two", "", False),
    ("CS", ["ORIGINAL", "PRIMARY"], "", True), ("CS", ["ORIGINAL", "primary"], "", False),
])
def test_values_are_judged_by_their_vr_and_meaning(vr: str, value: object, keyword: str,
                                                   valid: bool) -> None:
    assert valid_value(vr, value, keyword) is valid
