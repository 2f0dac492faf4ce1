"""Helpers for tests of objects read from the page cache."""

from __future__ import annotations

import os
from pathlib import Path


def page_cache_reads_work(folder: Path) -> bool:
    """Whether the file system under `folder` takes RWF_NOWAIT reads (ext4, xfs, btrfs do;
    tmpfs does not: there every opened object is read the blocking way)."""
    if not hasattr(os, "RWF_NOWAIT"):
        return False
    probe = folder / ".nowait-probe"
    probe.write_bytes(b"x")
    fd = os.open(probe, os.O_RDONLY)
    try:
        return os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT) == 1
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


def opened_under(folder: Path) -> int:
    """Descriptors of this process open on files under `folder`."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}").startswith(str(folder))
        except OSError:  # closed meanwhile
            pass
    return count
