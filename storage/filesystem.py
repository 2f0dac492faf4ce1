"""Filesystem object store: one file per key under a root directory, written atomically."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import stat
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from storage.objects import (
    AlreadyExists,
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    validate_key,
)


class _Descriptors:
    """The descriptors a store's opened objects hold, capped: a slow client keeps its
    opened objects until it has taken them, and past the cap objects are read instead."""

    def __init__(self, cap: int) -> None:
        # One token per descriptor allowed. list.pop and list.append are atomic, and take no
        # lock a garbage-collector finalizer could find already held by its own thread.
        self._tokens: list[None] = [None] * cap
        #: Reads that fail rather than wait for the disk (RWF_NOWAIT, Linux 4.14+); off for
        #: good once the file system refuses it (tmpfs, NFS, FUSE).
        self.nowait: int | None = getattr(os, "RWF_NOWAIT", None)

    def take(self) -> bool:
        try:
            self._tokens.pop()
        except IndexError:
            return False
        return True

    def release(self) -> None:
        self._tokens.append(None)

    def close(self, fd: int) -> None:
        try:
            os.close(fd)
        finally:
            self.release()


class OpenedFile:
    """An object file opened for one read (see `storage.OpenedObject`). Its descriptor is
    closed by `close()`, or when the object is collected: a stream cut off early leaks
    nothing."""

    def __init__(self, key: str, fd: int, descriptors: _Descriptors) -> None:
        info = os.fstat(fd)  # before the finalizer: on failure the caller closes fd
        self.key = key
        self.is_directory = stat.S_ISDIR(info.st_mode)
        # Only a non-empty regular file's size is surely its length: a device says 0, and
        # so does a /proc file, regular or not.
        self.size: int | None = (
            info.st_size if stat.S_ISREG(info.st_mode) and info.st_size else None
        )
        self._fd = fd
        self._descriptors = descriptors
        self._closer = weakref.finalize(self, descriptors.close, fd)

    def read_cached(self) -> memoryview | None:
        flag = self._descriptors.nowait
        if flag is None or self.size is None or not self._closer.alive:
            return None
        buffer = bytearray(self.size)
        try:
            count = os.preadv(self._fd, [buffer], 0, flag)
        except OSError as exc:  # EAGAIN: not all cached; other errors: read() tells
            if exc.errno == errno.EOPNOTSUPP:
                self._descriptors.nowait = None
            return None
        # A part in the cache only, or a file that shrank: read() does it properly.
        return memoryview(buffer) if count == self.size else None

    def read(self) -> bytes:
        """The whole file from its start, whatever was read before."""
        if not self._closer.alive:
            raise StorageError(f"object {self.key!r} read after close")
        chunks: list[bytes] = []
        offset = 0
        with _read_errors(self.key):
            # A regular file in one read of its size; anything else to its end.
            while self.size is None or offset < self.size:
                chunk = os.pread(
                    self._fd, 1 << 20 if self.size is None else self.size - offset, offset
                )
                if not chunk:
                    break
                chunks.append(chunk)
                offset += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def close(self) -> None:
        self._closer()


@contextlib.contextmanager
def _read_errors(key: str) -> Iterator[None]:
    """A failed read of `key` as the store's errors: no such file (or a folder where the
    object should be) is ObjectNotFound, any other failure a StorageError."""
    try:
        yield
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise ObjectNotFound(key) from exc
    except OSError as exc:
        raise StorageError(f"cannot read object {key!r}: {exc.strerror}") from exc


def _open_for_reading(path: Path) -> int:
    """A descriptor to read `path`, without updating its access time where the process may
    (it owns the file): the first read after a write would otherwise write the inode, a
    journal transaction, on the event loop that reads from the page cache."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOATIME)
    except PermissionError:  # O_NOATIME on a file owned by another user
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


class FilesystemObjectStore:
    """Objects as files; a put is temp file + fsync + rename, so readers never see a torn object."""

    def __init__(self, root: Path, max_opened: int | None = None) -> None:
        self.root = Path(root).resolve()
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 16
        # A quarter of the process's descriptors at most (256 under systemd's default 1,024).
        self._descriptors = _Descriptors(
            max(8, min(1024, soft // 4)) if max_opened is None else max_opened
        )

    def _path(self, key: str) -> Path:
        # A valid key has no empty, '.' or '..' segment and no leading '/': joined to the
        # root it names a path under the root, with no file system call. (resolve() here
        # cost 45 µs per object: 2.2 ms of a 50-instance series retrieval.)
        path = self.root.joinpath(validate_key(key))
        if not path.is_relative_to(self.root):  # cannot happen with a valid key; kept cheap
            raise InvalidKey(f"key escapes the store root: {key!r}")
        return path

    def put(self, key: str, body: bytes, *, content_type: str = "application/dicom") -> None:
        self._write(key, body, replace=True)

    def create(self, key: str, body: bytes, *, content_type: str = "application/dicom") -> None:
        self._write(key, body, replace=False)

    def _write(self, key: str, body: bytes, *, replace: bool) -> None:
        """Write a temporary file, fsync it, then move it into place: `os.replace` for a
        put, `os.link` for a create (it fails if the name exists: exactly one racing
        creator wins, and a reader never sees a partial object)."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(body)
                    handle.flush()
                    os.fsync(handle.fileno())
                if replace:
                    os.replace(temp_name, path)
                else:
                    os.link(temp_name, path)
            except FileExistsError:
                raise AlreadyExists(key) from None
            finally:
                Path(temp_name).unlink(missing_ok=True)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StorageError(f"cannot write object {key!r}: {exc.strerror}") from exc

    def get(self, key: str) -> bytes:
        with _read_errors(key):
            return self._path(key).read_bytes()

    def open(self, key: str) -> OpenedFile | None:
        """The object under `key`, opened for a read (ObjectNotFound when absent): its
        bytes can then come from the page cache on an event loop (`read_cached`). None when
        the store's opened objects are at their cap: read it with `get` instead."""
        path = self._path(key)
        if not self._descriptors.take():
            return None
        with _read_errors(key):
            try:
                fd = _open_for_reading(path)
            except BaseException:
                self._descriptors.release()
                raise
            try:
                opened = OpenedFile(key, fd, self._descriptors)
            except BaseException:
                self._descriptors.close(fd)
                raise
        if opened.is_directory:  # as get(): a folder where an object should be is no object
            opened.close()
            raise ObjectNotFound(key)
        return opened

    def head(self, key: str) -> ObjectInfo:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return ObjectInfo(key, path.stat().st_size)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete object {key!r}: {exc.strerror}") from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under `prefix`, walked completely before the first is yielded: an
        unreadable folder or object raises StorageError before the caller acts on a part."""
        if not self.root.exists():
            return
        found: list[ObjectInfo] = []

        def unreadable(error: OSError) -> NoReturn:
            raise StorageError(f"cannot list the object store: {error.strerror} ({error.filename})")

        # Links are followed, as get and put follow them (a `studies` folder linked to
        # another disk): `reindex` lists what reads can reach. A folder reached twice (a
        # link cycle, or two links to one place) is walked once.
        walked: set[tuple[int, int]] = set()
        for directory, folders, files in os.walk(self.root, onerror=unreadable, followlinks=True):
            try:
                identity = os.stat(directory)
            except OSError as exc:
                unreadable(exc)
            if (identity.st_dev, identity.st_ino) in walked:
                folders[:] = []
                continue
            walked.add((identity.st_dev, identity.st_ino))
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                full = Path(directory) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    try:
                        found.append(ObjectInfo(key, full.stat().st_size))
                    except OSError as exc:  # a broken link, a loop: never skipped silently
                        unreadable(exc)
        yield from sorted(found, key=lambda info: info.key)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"object root unusable: {exc.strerror}") from exc
        if not os.access(self.root, os.W_OK):
            raise StorageError("object root is not writable")
