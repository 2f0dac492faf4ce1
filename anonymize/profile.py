"""PS3.15 Table E.1-1 as data: the action the Basic Profile (and its options) assigns to a tag.

The table is generated from the standard by scripts/generate_profile_table.py; its
attribution travels in the JSON file. Matching is by tag number (pydicom does not know
every 2026c tag); repeating groups (50xx, 60xx) are matched by masking.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from importlib import resources

from pydicom.datadict import keyword_for_tag


class Action(StrEnum):
    """The action codes of PS3.15 Table E.1-1."""

    DUMMY = "D"
    ZERO = "Z"
    REMOVE = "X"
    KEEP = "K"
    CLEAN = "C"
    UID = "U"
    REMOVE_OR_ZERO = "X/Z"
    REMOVE_OR_DUMMY = "X/D"
    ZERO_OR_DUMMY = "Z/D"
    REMOVE_ZERO_OR_DUMMY = "X/Z/D"
    REMOVE_ZERO_OR_UID = "X/Z/U*"


@dataclass(frozen=True)
class ProfileRow:
    """One row of Table E.1-1."""

    tag: str
    name: str
    basic: Action
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class ConfidentialityProfile:
    """The table, indexed for lookup by tag number."""

    rows: dict[int, ProfileRow]
    masked_rows: tuple[tuple[int, int, ProfileRow], ...]
    private_row: ProfileRow
    attribution: str

    @property
    def compound_keywords(self) -> frozenset[str]:
        """Keywords of the rows whose action depends on the IOD's attribute type."""
        return _compound_keywords(self)

    def row_for(self, tag: int) -> ProfileRow | None:
        """The row for a public tag, or None when the profile does not list it (keep)."""
        row = self.rows.get(tag)
        if row is not None:
            return row
        for mask, value, masked in self.masked_rows:
            if tag & mask == value:
                return masked
        return None


@lru_cache(maxsize=4)
def _compound_keywords(profile: ConfidentialityProfile) -> frozenset[str]:
    compound = {
        Action.REMOVE_OR_ZERO,
        Action.REMOVE_OR_DUMMY,
        Action.ZERO_OR_DUMMY,
        Action.REMOVE_ZERO_OR_DUMMY,
    }
    return frozenset(
        keyword_for_tag(tag)
        for tag, row in profile.rows.items()
        if row.basic in compound and keyword_for_tag(tag)
    )


def _parse_pattern(pattern: str) -> tuple[int, int]:
    """'60xx3000' -> (mask, value) with the x nibbles masked out."""
    mask = int("".join("0" if ch == "x" else "f" for ch in pattern), 16)
    value = int(pattern.replace("x", "0"), 16)
    return mask, value


@lru_cache(maxsize=1)
def load_profile() -> ConfidentialityProfile:
    """Load the packaged table (cached; the object is immutable)."""
    text = resources.files("anonymize").joinpath("data/confidentiality_profile.json").read_text()
    document = json.loads(text)
    rows: dict[int, ProfileRow] = {}
    masked: list[tuple[int, int, ProfileRow]] = []
    private_row: ProfileRow | None = None
    for raw in document["rows"]:
        row = ProfileRow(raw["tag"], raw["name"], Action(raw["basic"]), dict(raw["options"]))
        if raw["tag"] == "private":
            private_row = row
        elif "x" in raw["tag"]:
            masked.append((*_parse_pattern(raw["tag"]), row))
        else:
            rows[int(raw["tag"], 16)] = row
    # The 2026c rows write repeating groups by their first member: (5000,0000), (6000,3000)...
    for tag in [t for t in rows if (t >> 16) in (0x5000, 0x6000)]:
        row = rows.pop(tag)
        masked.append((0xFF00FFFF if tag >> 16 == 0x6000 else 0xFF000000, tag, row))
    if private_row is None:
        raise RuntimeError("profile table lacks the private-attributes row")
    return ConfidentialityProfile(rows, tuple(masked), private_row, document["attribution"])
