"""What a share allows beyond viewing its studies, as a set.

A share always lets its recipient view what it scopes. Each permission here adds one thing;
a share holds any set of them (`ShareRecord.permissions`, stored as their names). Adding a
permission: a member here, the check where it applies (`Principal.may`, the routes that
need it), and the viewer's control for it (`data-permissions` on the viewer page)."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Permission(StrEnum):
    #: Whole instances: the ZIP File-set and WADO-RS retrieve of instances (not only the
    #: rendered images and metadata the viewer shows).
    DOWNLOAD = "download"


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


__all__ = ["Permission", "permissions_of"]
