"""The safe-private list of the Retain Safe Private Option (PS3.15 Table E.3.10-1)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources


@dataclass(frozen=True)
class SafePrivateAttributes:
    """Private attributes (group, creator, element offset) that may be retained, with their VR.

    `retain_bulk` keeps OB/OW/UN values too; off by default, since the standard warns that
    vendor bulk data may embed the patient's name.
    """

    entries: dict[tuple[int, str, int], str]
    attribution: str = ""
    retain_bulk: bool = False

    def vr_of(self, group: int, creator: str, element_offset: int) -> str | None:
        """The table's VR ('' when the standard gives none) if listed, else None."""
        return self.entries.get((group, creator.strip(), element_offset))

    def is_safe(self, group: int, creator: str, element_offset: int) -> bool:
        return self.vr_of(group, creator, element_offset) is not None

    def __len__(self) -> int:
        return len(self.entries)


@lru_cache(maxsize=1)
def load_safe_private() -> SafePrivateAttributes:
    """The packaged Table E.3.10-1 (cached; immutable)."""
    text = resources.files("anonymize").joinpath("data/safe_private_attributes.json").read_text()
    document = json.loads(text)
    entries = {
        (int(row["group"], 16), row["private_creator"].strip(), int(row["element"], 16)): row["vr"]
        for row in document["rows"]
    }
    return SafePrivateAttributes(entries, document.get("attribution", ""))
