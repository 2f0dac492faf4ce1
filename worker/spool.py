"""The spool: acknowledged instances on local disk until the worker has stored them.

Written by the DICOM node (C-STORE), STOW-RS and `import`; read by the ingest pipeline.

Layout: <root>/<site>/<batch>/<SOPInstanceUID>.dcm, one batch per (association, study).
Each file is written to a temp name, fsynced, renamed and its directory fsynced before the
SCP answers Success, so an acknowledged instance survives any crash after the answer.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import re
import secrets
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: Keys batch ids (see Spool.batch_id); never written anywhere.
_BATCH_KEY = secrets.token_bytes(32)
SPOOL_SUFFIX = ".dcm"


class SpoolError(Exception):
    """Base of spool failures."""


class SpoolWriteError(SpoolError):
    """The instance could not be made durable (disk full, permissions...)."""


def fsync_directory(path: str | Path) -> None:
    """Make a rename or creation in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_association_tag() -> str:
    """A unique, sortable prefix for the batches of one association."""
    now = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    return f"{now}-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class Spool:
    """One site's spool directory."""

    root: Path
    site_id: str

    @property
    def site_dir(self) -> Path:
        return self.root / self.site_id

    def batch_id(self, association_tag: str, study_instance_uid: str) -> str:
        """The batch of one study within one association. Batch ids travel in broker
        messages: the study UID is hashed with a key that lives only in this process (one
        association never outlives it), so nobody can confirm a candidate original UID."""
        digest = hmac.new(_BATCH_KEY, study_instance_uid.encode(), hashlib.sha256).hexdigest()[:16]
        return f"{association_tag}-{digest}"

    def write(self, batch_id: str, sop_instance_uid: str, encoded: bytes) -> Path:
        """Durably write one Part 10 instance; raise SpoolWriteError if it is not on disk."""
        return self._durable(batch_id, sop_instance_uid, lambda handle: handle.write(encoded))

    def write_file(self, batch_id: str, sop_instance_uid: str, source: Path) -> Path:
        """Durably copy a received Part 10 file into the spool, 1 MiB at a time (a 1 GB
        instance is never in memory); raise SpoolWriteError if it is not on disk."""

        def copy(handle: BinaryIO) -> None:
            with open(source, "rb") as reader:
                shutil.copyfileobj(reader, handle, 1 << 20)

        return self._durable(batch_id, sop_instance_uid, copy)

    def _durable(self, batch_id: str, sop_instance_uid: str,
                 fill: Callable[[BinaryIO], object]) -> Path:
        """Temp file, fsync, rename, fsync the directory: on disk before we return."""
        if not _UID.match(sop_instance_uid) or len(sop_instance_uid) > 64:
            raise ValueError("SOP Instance UID is not a valid UID")
        directory = self.site_dir / batch_id
        target = directory / f"{sop_instance_uid}{SPOOL_SUFFIX}"
        temp = directory / f".{sop_instance_uid}.{uuid.uuid4().hex[:8]}.part"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with open(temp, "wb") as handle:
                fill(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
            fsync_directory(directory)
        except OSError as exc:
            try:
                temp.unlink(missing_ok=True)
            except OSError:
                pass  # the directory itself is unusable; nothing was written
            raise SpoolWriteError(exc.strerror or type(exc).__name__) from exc
        return target

    def stale_batches(self, older_than_seconds: float) -> list[str]:
        """Batches with instances whose newest file is older than the threshold.

        Used by the sweeper: a batch left behind by a crash between acknowledgement and
        enqueue, or by a lost task, is enqueued again.
        """
        if not self.site_dir.is_dir():
            return []
        cutoff = time.time() - older_than_seconds
        stale = []
        for batch in sorted(self.site_dir.iterdir()):
            if not batch.is_dir():
                continue
            try:
                files = list(batch.iterdir())
                if any(f.suffix == SPOOL_SUFFIX for f in files) and max(
                    f.stat().st_mtime for f in files
                ) < cutoff:
                    stale.append(batch.name)
            except (OSError, ValueError):
                continue  # the worker removed it while we looked
        return stale
