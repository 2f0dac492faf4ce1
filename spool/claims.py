"""Who holds a spool batch now, and what was last done to hand it to a worker.

Recovery rests on facts the kernel and the file system keep, not on idle thresholds:

- a **claim** is an exclusive `flock` on `<batch>/.claim`, held by the process writing the
  batch (the node during its association, STOW-RS during its request) or processing it
  (a worker). The kernel releases it when that process dies, whatever kills it;
- a **pending record**, `<batch>/.pending`, says what the last holder did with the batch:
  handed to the broker (`queued`, with the broker's identity then), taken from it by a worker process (`reserved`, naming
  that process's mark), being processed (`started`), or waiting to be tried again after
  a failure that is not the batch's fault (`retry`, with when and why);
- a **process mark** is an `flock` a worker's main process holds for its lifetime on
  `<spool>/.processes/<name>.lock`: a `reserved` record whose process's mark is free was
  lost with that process.

`spool.recovery` reads these to decide, batch by batch, whether the task that should
process it can no longer exist. No value from a data set is ever written here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Self

from spool.batches import PRIVATE_FILE_MODE, open_private, private_directory

CLAIM_FILE = ".claim"
PENDING_FILE = ".pending"
_PROCESSES = ".processes"

State = Literal["queued", "reserved", "started", "retry"]


class BatchClaim:
    """An exclusive hold on one batch folder (or any job folder), released by `release()`
    or by the kernel when the holder dies."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, directory: Path, *, wait: bool, create: bool = False) -> BatchClaim | None:
        """Hold `directory`'s claim. `wait`: block until the holder lets go (a worker behind
        a writer or another worker); else None when someone holds it. `create`: make the
        folder (0700) if missing; else None when it is missing (the batch was processed)."""
        if create:
            private_directory(directory)
        try:
            fd = os.open(
                directory / CLAIM_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE
            )
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return cls(directory, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor drops the lock

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


@dataclass(frozen=True)
class PendingRecord:
    """What the last holder of a batch did with it (times are `time.time()`)."""

    state: State
    at: float
    #: `reserved`: the mark of the worker process that took the message.
    by: str = ""
    #: `retry`: not before this time, unless what failed is seen to be back.
    retry_at: float = 0.0
    #: Failed attempts so far (reset when the batch is processed).
    attempts: int = 0
    #: `retry`: what failed, as an exception type name (never a value).
    reason: str = ""
    #: `queued`, `reserved`: the identity of the broker the task was sent to (a Redis run
    #: id, new at each start; "" for brokers that keep their queues).
    epoch: str = ""

    def evolve(self, state: State, **changes: object) -> PendingRecord:
        values = {**asdict(self), "at": time.time(), **changes, "state": state}
        return PendingRecord(**values)


def read_pending(directory: Path) -> PendingRecord | None:
    """The batch's record, or None (none written, or unreadable: treated as none)."""
    try:
        document = json.loads((directory / PENDING_FILE).read_bytes())
        return PendingRecord(**document)
    except (OSError, ValueError, TypeError):
        return None


def write_pending(directory: Path, record: PendingRecord) -> None:
    """Replace the batch's record (written aside and renamed: never seen half-written).
    Not fsynced: after a power cut, a lost record only means the batch looks unsent, and
    is sent again."""
    temp = directory / f"{PENDING_FILE}.{uuid.uuid4().hex[:8]}"
    with open_private(temp) as handle:
        handle.write(json.dumps(asdict(record)).encode())
    os.replace(temp, directory / PENDING_FILE)


def clear_pending(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (directory / PENDING_FILE).unlink()


def processes_dir(spool_root: Path) -> Path:
    return spool_root / _PROCESSES


class ProcessMark:
    """A lock a process holds on `<spool>/.processes/<name>.lock` for its lifetime: others
    can tell whether it is alive (`alive`) and whether any process of a kind is
    (`any_alive`)."""

    def __init__(self, spool_root: Path, kind: str) -> None:
        self.spool_root = spool_root
        self.name = f"{kind}-{socket.gethostname()}-{os.getpid()}"
        folder = private_directory(processes_dir(spool_root))
        self._fd: int | None = os.open(
            folder / f"{self.name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE
        )
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def close(self) -> None:
        """Let go (at a clean stop): the mark is removed."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            (processes_dir(self.spool_root) / f"{self.name}.lock").unlink()
        self.close_inherited()

    def close_inherited(self) -> None:
        """In a child process: close the copy of the descriptor fork gave it (the lock lasts
        while any copy is open), leaving the parent's mark in place."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    @staticmethod
    def alive(spool_root: Path, name: str) -> bool:
        """Whether the process that took `name` still holds its mark. A mark found free is
        removed (its process is gone)."""
        path = processes_dir(spool_root) / f"{name}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        return False

    @staticmethod
    def any_alive(spool_root: Path, kind: str) -> bool:
        """Whether any process of `kind` holds a mark on this spool."""
        folder = processes_dir(spool_root)
        try:
            names = [p.stem for p in folder.glob(f"{kind}-*.lock")]
        except OSError as exc:  # pragma: no cover - an unreadable folder: none can be seen
            if exc.errno == errno.ENOENT:
                return False
            raise
        return any(ProcessMark.alive(spool_root, name) for name in names)
