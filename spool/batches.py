"""The spool: acknowledged instances on local disk until the worker has stored them.

Written by the DICOM node (C-STORE), STOW-RS and `import`; read by the ingest pipeline.

Layout: <root>/<site>/<batch>/<SOPInstanceUID>.dcm, one batch per (association, study).
Each file is written to a temp name, fsynced, renamed and its directory fsynced before the
SCP answers Success, so an acknowledged instance survives any crash after the answer.

Spooled instances are identified data: files are created 0600 and folders 0700 whatever the
process umask (a umask only removes bits), so no other local user can read them.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import hmac
import logging
import os
import secrets
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from imaging import is_uid_shaped

if TYPE_CHECKING:
    from spool.claims import BatchClaim

log = logging.getLogger(__name__)

SPOOL_SUFFIX = ".dcm"


class SpoolError(Exception):
    """Base of spool failures."""


class SpoolWriteError(SpoolError):
    """The instance could not be made durable (disk full, permissions...)."""


#: Modes of files and folders holding identified data (spool, quarantine, broker messages).
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIRECTORY_MODE = 0o700


def private_directory(path: str | Path) -> Path:
    """`path` as a folder only its owner can enter: created 0700 with any missing parents
    (mkdir -p would make parents by the umask), tightened to 0700 if it exists wider."""
    path = Path(path)
    missing: list[Path] = []
    current = path
    while not current.is_dir():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=PRIVATE_DIRECTORY_MODE)
        except FileExistsError:
            pass  # created by a concurrent writer, with the same mode
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        os.chmod(path, PRIVATE_DIRECTORY_MODE)
    return path


def open_private(path: str | Path, *, exclusive: bool = True) -> BinaryIO:
    """Open `path` for writing, created 0600 (an existing file is truncated and tightened
    unless `exclusive`, which refuses it)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, PRIVATE_FILE_MODE)
    try:
        if not exclusive:
            os.fchmod(fd, PRIVATE_FILE_MODE)  # an older file keeps its mode otherwise
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def close_private_tree(root: str | Path) -> int:
    """Tighten what an older version (or another tool) left readable under `root`: folders
    to 0700, files to 0600; symbolic links are left alone. Returns how many were changed."""
    root = Path(root)
    if not root.is_dir():
        return 0
    changed = 0
    entries = [(root, PRIVATE_DIRECTORY_MODE)]
    for folder, folders, files in os.walk(root):
        entries += [(Path(folder, name), PRIVATE_DIRECTORY_MODE) for name in folders]
        entries += [(Path(folder, name), PRIVATE_FILE_MODE) for name in files]
    not_ours = 0
    for path, mode in entries:
        try:
            info = path.lstat()
            if not stat.S_ISLNK(info.st_mode) and stat.S_IMODE(info.st_mode) & 0o077:
                os.chmod(path, mode)
                changed += 1
        except FileNotFoundError:
            continue  # processed while we walked
        except PermissionError:
            not_ours += 1  # another user's file: reported, not fatal
    if not_ours:
        log.warning(
            "%d files or folders under %s are readable by other users and not ours to close",
            not_ours,
            root,
        )
    return changed


def remove_older_than(paths: Iterable[Path], seconds: float) -> int:
    """Remove the files among `paths` last modified more than `seconds` ago (leftovers of
    a writer or reader that died); how many were removed."""
    removed = 0
    limit = time.time() - seconds
    for path in paths:
        try:
            if path.stat().st_mtime < limit:
                path.unlink()
                removed += 1
        except OSError:
            continue  # removed meanwhile, or not ours
    return removed


def incoming_dir(spool_root: Path) -> Path:
    """Where STOW-RS parts are written while they arrive: private, and on the spool's file
    system, so that an accepted part is moved into its batch rather than copied. (The
    node's C-STORE data sets arrive in `receiving_dir`.)"""
    return spool_root / ".incoming"


def receiving_dir(spool_root: Path) -> Path:
    """Where the node's data sets are written while they arrive (`dicom_node.receive`): one
    folder per node process under it; on the spool's file system, so that an accepted data
    set is renamed into its batch."""
    return spool_root / ".receiving"


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
    #: Keys the study part of batch ids; random, kept in this process's memory only.
    batch_key: bytes = field(
        default_factory=lambda: secrets.token_bytes(32), repr=False, compare=False
    )

    @property
    def site_dir(self) -> Path:
        return self.root / self.site_id

    def batch_id(self, association_tag: str, study_instance_uid: str) -> str:
        """The batch of one study within one association: the same for every instance of
        the study this spool receives in that association, different for another study.
        Batch ids travel through the broker: the study part is an HMAC under a key that never
        leaves this process (an unkeyed hash would let whoever reads the broker confirm a
        candidate original Study Instance UID), over the association too (two associations'
        batches of one study cannot be linked)."""
        digest = hmac.new(
            self.batch_key, f"{association_tag}\0{study_instance_uid}".encode(), hashlib.sha256
        ).hexdigest()[:16]
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

    def move_file(self, batch_id: str, sop_instance_uid: str, source: Path) -> Path:
        """Durably move a received Part 10 file into the spool. A file on the spool's file
        system (as `incoming_dir` is) is renamed: its bytes are written once. Another is
        copied (`write_file`) and left where it was. Raise SpoolWriteError if it is not on
        disk."""
        target, directory = self._target(batch_id, sop_instance_uid)
        try:
            if not directory.is_dir():
                private_directory(directory)
            fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fchmod(fd, PRIVATE_FILE_MODE)  # whatever mode its writer gave it
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(source, target)
            fsync_directory(directory)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                return self.write_file(batch_id, sop_instance_uid, source)
            raise SpoolWriteError(exc.strerror or type(exc).__name__) from exc
        return target

    def _target(self, batch_id: str, sop_instance_uid: str) -> tuple[Path, Path]:
        if not is_uid_shaped(sop_instance_uid):
            raise ValueError("SOP Instance UID is not a valid UID")
        directory = self.site_dir / batch_id
        return directory / f"{sop_instance_uid}{SPOOL_SUFFIX}", directory

    def _durable(
        self, batch_id: str, sop_instance_uid: str, fill: Callable[[BinaryIO], object]
    ) -> Path:
        """Temp file, fsync, rename, fsync the directory: on disk before we return."""
        target, directory = self._target(batch_id, sop_instance_uid)
        temp = directory / f".{sop_instance_uid}.{uuid.uuid4().hex[:8]}.part"
        try:
            if not directory.is_dir():
                private_directory(directory)
            with open_private(temp) as handle:
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

    def claim(self, batch_id: str) -> BatchClaim:
        """Hold a batch while writing it (`spool.claims`), its folder created if missing.
        Raise SpoolWriteError if the folder cannot be made, ValueError for a bad name."""
        if "/" in batch_id or batch_id.startswith(".") or not batch_id:
            raise ValueError("not a batch name")
        from spool.claims import BatchClaim  # (spool.claims builds on this module)

        try:
            claim = BatchClaim.acquire(self.site_dir / batch_id, wait=True, create=True)
        except OSError as exc:
            raise SpoolWriteError(exc.strerror or type(exc).__name__) from exc
        if claim is None:  # pragma: no cover - the folder was just created
            raise SpoolWriteError("the batch folder disappeared")
        return claim
