"""File modes, as the site-files tests check them."""

from __future__ import annotations

import stat
from pathlib import Path


def file_mode(path: Path) -> int:
    """The permission bits of `path` itself (a link is not followed)."""
    return stat.S_IMODE(path.lstat().st_mode)
