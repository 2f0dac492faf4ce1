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
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Self

from spool.batches import PRIVATE_FILE_MODE, open_private, private_directory

CLAIM_FILE = ".claim"
PENDING_FILE = ".pending"
RESERVED_FILE = ".reserved"
_PROCESSES = ".processes"

State = Literal["queued", "reserved", "started", "retry"]


#: Descriptors of the claims and marks this process holds. A process forked from it (a
#: worker's pool replacing a child) closes its copies at once: the lock lasts while any
#: copy is open, and a child must not hold its parent's batch for its own lifetime.
_HELD: set[int] = set()
_HELD_LOCK = threading.Lock()


def _close_inherited() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited)


def _hold(fd: int) -> int:
    with _HELD_LOCK:
        _HELD.add(fd)
    return fd


def _let_go(fd: int) -> None:
    with _HELD_LOCK:
        _HELD.discard(fd)
    os.close(fd)


class BatchClaim:
    """An exclusive hold on one batch folder (or any job folder), released by `release()`
    or by the kernel when the holder dies."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self._fd: int | None = fd
        self._pid = os.getpid()

    @classmethod
    def acquire(cls, directory: Path, *, wait: bool, create: bool = False) -> BatchClaim | None:
        """Hold `directory`'s claim. `wait`: block until the holder lets go (a worker behind
        a writer or another worker); else None when someone holds it. `create`: make the
        folder (0700) if missing; else None when it is missing (the batch was processed).

        A claim file removed while we waited for it (its folder emptied by the worker that
        held it) is no claim: we look again, and find the folder gone, or a new claim."""
        path = directory / CLAIM_FILE
        while True:
            if create:
                private_directory(directory)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
            except FileNotFoundError:
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                held, current = os.fstat(fd), os.stat(path)
            except BlockingIOError:
                os.close(fd)
                return None
            except FileNotFoundError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            if (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
                return cls(directory, _hold(fd))
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            if os.getpid() == self._pid:  # (a forked child closed its copy already)
                _let_go(fd)  # closing the last descriptor drops the lock

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


def _read(path: Path) -> PendingRecord | None:
    try:
        return PendingRecord(**json.loads(path.read_bytes()))
    except (OSError, ValueError, TypeError):
        return None  # none written, or unreadable: treated as none


def _write(path: Path, record: PendingRecord) -> None:
    """Written aside and renamed: never seen half-written. Not fsynced: after a power cut,
    a lost record only means the batch looks unsent, and is sent again."""
    temp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}")
    with open_private(temp) as handle:
        handle.write(json.dumps(asdict(record)).encode())
    os.replace(temp, path)


def _clear(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def read_pending(directory: Path) -> PendingRecord | None:
    """The batch's record, written by whoever holds its claim."""
    return _read(directory / PENDING_FILE)


def write_pending(directory: Path, record: PendingRecord) -> None:
    _write(directory / PENDING_FILE, record)


def clear_pending(directory: Path) -> None:
    _clear(directory / PENDING_FILE)


def read_reserved(directory: Path) -> PendingRecord | None:
    """Who took the batch's task without its claim (a worker's main process when the
    broker delivered it, or `import` for its own batches): `<batch>/.reserved`, apart from
    the record the claim holders write, so that neither overwrites the other."""
    return _read(directory / RESERVED_FILE)


def write_reserved(directory: Path, record: PendingRecord) -> None:
    _write(directory / RESERVED_FILE, record)


def clear_reserved(directory: Path) -> None:
    _clear(directory / RESERVED_FILE)


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with that id exists (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True


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
        # Locked before it has its name: whoever finds the mark finds it held.
        temp = folder / f".{self.name}.{uuid.uuid4().hex[:8]}"
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.replace(temp, folder / f"{self.name}.lock")
        self._fd: int | None = _hold(fd)
        self._pid = os.getpid()

    def close(self) -> None:
        """Let go (at a clean stop): the mark is removed."""
        fd, self._fd = self._fd, None
        if fd is None or os.getpid() != self._pid:
            return  # (a forked child closed its copy at the fork; the mark is its parent's)
        with contextlib.suppress(OSError):
            (processes_dir(self.spool_root) / f"{self.name}.lock").unlink()
        _let_go(fd)

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
