"""What a share allows beyond viewing its studies, as a set.

A share always lets its recipient view what it scopes. Each permission here adds one thing;
a share holds any set of them (`ShareRecord.permissions`, stored as their names). Adding a
permission: a member and its description here, the check where it applies
(`Principal.may(Permission.X)` in the route that needs it), and the viewer's control for
it (`permitted(data, "x")` in static/viewer/viewer.js). The API schema, the CLI and the
stored share take any member as they are."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Permission(StrEnum):
    #: Whole instances: the ZIP File-set and WADO-RS retrieve of instances (not only the
    #: rendered images and metadata the viewer shows).
    DOWNLOAD = "download"


#: Each permission's meaning, for help texts and the API's schema.
DESCRIPTIONS: dict[Permission, str] = {
    Permission.DOWNLOAD: "the ZIP of DICOM files and whole-instance WADO-RS retrieve",
}


def described() -> str:
    """The permissions and their meanings, in one line: "download (...)"."""
    return "; ".join(f"{p.value} ({DESCRIPTIONS[p]})" for p in Permission)


def permissions_of(names: Iterable[str]) -> frozenset[Permission]:
    """The permissions named (an unknown name raises ValueError, naming it)."""
    found = set()
    for name in names:
        try:
            found.add(Permission(name))
        except ValueError:
            known = ", ".join(p.value for p in Permission)
            raise ValueError(f"unknown permission {name!r} (known: {known})") from None
    return frozenset(found)


__all__ = ["DESCRIPTIONS", "Permission", "described", "permissions_of"]
