"""Reads on the event loop, and the plain path beside them: where a request's index reads
and stored-object reads run is decided here, and only here.

The plain path: a worker thread runs the read (`storage.IndexRepository`, `ObjectStore.get`),
as any other blocking call. The loop path skips the hand-off to a thread and back, which
costs more than the read itself, where the read can be kept from waiting:

- index reads (a QIDO-RS search, an API key lookup) on a SQLite index file, within a time
  budget (`InlineReads`, `read_now`, `answer_search`);
- stored objects of a WADO-RS answer from a filesystem store, taken from the page cache
  without ever waiting for the disk (`open_stored`, `multipart_body`).

PostgreSQL, an in-memory SQLite database, `HTTP__INLINE_READ_BUDGET_MS=0` and an S3 store
always take the plain path: the production column never reads on the loop.

Measured 2026-12-06 on 2 vCPUs (`benchmarks/dicomweb.py --orthanc` alternated with the
machinery switched off, and `dicom-gateway api` of two trees over one data folder, requests
alternated one by one): QIDO-RS by PatientID p50 by curl 0.51-0.56 ms against 0.72 ms on
the plain path, server CPU 0.54 against 0.71 ms a search; with an API key 0.89 against
1.42 ms; an uncompressed 26 MB series 1,289 against 1,109 MB/s sustained, p50 19.3 against
22.7 ms, server CPU 20.0 against 22.0 ms; the JPEG-LS series 742 against 655 MB/s.

Index reads. An event loop must not wait on a database: one that does not answer would
stall every request. The inline path bounds the wait. Each thread gets its own read-only
connection to the index file:

- no busy timeout: a database locked beyond what WAL readers ever see fails at once instead
  of waiting;
- a progress handler interrupts a statement that has run longer than the budget (SQLite's
  own time: building the statement and reading its rows are bounded by their size);
- `PRAGMA query_only`: nothing run here can write.

Study searches, the most frequent, skip SQLAlchemy's execution there: their statement
(`storage.study_search`, one per form of query) is compiled once and run on the sqlite3
connection itself. The statement's cache key, the pool checkout and the result rows cost
0.10 ms of the 0.15 ms a search takes through SQLAlchemy (in process): without it a search
by PatientID took 0.63 ms by curl instead of 0.51.

A read that fails either way is handed to the plain path. A key (the caller's name for a
form of read) that overran takes the plain path directly for a while, so a slow form of
search does not spend the budget on the event loop at every request. The budget counts
SQLite's own time, and sqlite3 gives up the GIL at every step and must take it back to look at
the clock: busy threads can stretch a read far past its budget, so nothing is read inline
while a thread of the request thread pool is at work.

Stored objects. A WADO-RS answer's objects are opened in a worker thread, `OPEN_AHEAD` per
hand-off, and each is read on the event loop when the page cache holds it: `preadv` with
`RWF_NOWAIT` fails at once rather than wait for the disk. An object the cache lacks is read
in a worker thread with the opened objects after it, about 1 MB per hand-off; so are all
objects where the file system refuses `RWF_NOWAIT` (tmpfs, NFS, FUSE: not asked again), and
objects above `LOOP_READ_MAX`. The loop lets other requests run after each `LOOP_READ_MAX`
it reads. At most a quarter of the process's descriptors are held by opened objects (256
under systemd's default 1,024); past that, objects are read the plain way. What a client
that hangs up had opened is closed at once.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import io
import os
import resource
import sqlite3
import stat
import threading
import time
import weakref
from collections import namedtuple
from collections.abc import AsyncIterator, Callable, Hashable, Iterable
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread
from fastapi import Request
from sqlalchemy import Engine, Select, create_engine, event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql.compiler import SQLCompiler

from storage import (
    AccessScope,
    FilesystemObjectStore,
    IndexRepository,
    InstanceQuery,
    ObjectStore,
    SeriesQuery,
    StorageError,
    StudyQuery,
    StudySummary,
    study_search,
    study_summaries,
)
from web_viewer_api.dicomweb.multipart import multipart_pieces

T = TypeVar("T")
R = TypeVar("R")
#: A study search row (a namedtuple) from its column values.
_MakeRow = Callable[[Iterable[Any]], tuple[Any, ...]]

#: SQLite virtual machine steps between two looks at the clock.
_STEPS_PER_CHECK = 1000
#: How long a key that overran goes straight to the plain path.
SLOW_KEY_SECONDS = 60.0
_MAX_SLOW_KEYS = 1024
#: Study search forms kept compiled (the repository keeps 512 statements).
_MAX_COMPILED = 256
#: Searches that may be answered inline: pages up to this size (more rows, more time on the
#: loop), and only those the caller says read nothing but the index (no `includefield`,
#: which reads stored objects) and answer in JSON (the XML conversion costs 0.4 ms a result).
INLINE_LIMIT = 100
#: Results whose answer (DICOM JSON, gzip) is written on the event loop; more go to a thread.
INLINE_ANSWER = 20


def _on_disk(engine: Engine) -> bool:
    database = engine.url.database or ""
    return (
        engine.dialect.name == "sqlite"
        and database not in ("", ":memory:")
        and "mode=memory" not in database
        and not database.startswith("file::memory:")
    )


class InlineReads:
    """`run(read)` answers `read(repository)` on this thread within `budget_seconds`, or
    returns None (budget spent, database busy, not a SQLite file): then take the plain path."""

    def __init__(self, engine: Engine, budget_seconds: float) -> None:
        self.budget = budget_seconds
        self.available = budget_seconds > 0 and _on_disk(engine)
        self._url = engine.url
        self._local = threading.local()
        self._engines: dict[Engine, sqlite3.Connection] = {}
        self._lock = threading.Lock()
        self._slow: dict[Hashable, float] = {}
        self._closed = False
        #: Study search statements compiled for this database, by statement.
        self._compiled: dict[Select[Any], tuple[SQLCompiler, _MakeRow]] = {}
        #: Reads answered here, and reads handed back (budget spent or database busy).
        self.answered = 0
        self.handed_back = 0

    def _repository(self) -> IndexRepository:
        held: _Held | None = getattr(self._local, "held", None)
        if held is not None:
            return held.repository
        connection = sqlite3.connect(self._url.database or "", timeout=0, check_same_thread=False)
        connection.execute("PRAGMA busy_timeout=0")
        connection.execute("PRAGMA query_only=ON")
        deadline = [float("inf")]  # not the holder: the engine must not keep it alive
        budget = self.budget

        def interrupt() -> int:
            return 1 if time.perf_counter() > deadline[0] else 0

        def start_clock(*_args: Any) -> None:
            deadline[0] = time.perf_counter() + budget

        connection.set_progress_handler(interrupt, _STEPS_PER_CHECK)
        # SQLAlchemy's reads (series, instances, keys) use the same connection.
        engine = create_engine(self._url, poolclass=StaticPool, creator=lambda: connection)
        event.listen(engine, "before_cursor_execute", start_clock)
        held = _Held(_InlineRepository(engine, connection, start_clock, self._compiled))
        with self._lock:
            if self._closed:
                engine.dispose()
                connection.close()
                raise RuntimeError("inline reads are closed")
            self._engines[engine] = connection
        # When the thread ends, its locals go and the connection is closed with them.
        weakref.finalize(held, self._forget, engine, connection)
        self._local.held = held
        return held.repository

    def _forget(self, engine: Engine, connection: sqlite3.Connection) -> None:
        with self._lock:
            self._engines.pop(engine, None)
        engine.dispose()
        connection.close()

    def warm(self) -> None:
        """Open this thread's connection and load the schema now (at start-up, before any
        request waits on it: opening is where SQLite may have to recover a WAL)."""
        if self.available:
            with self._repository().engine.connect() as connection:
                connection.exec_driver_sql("SELECT count(*) FROM sqlite_master").all()

    def run(self, read: Callable[[IndexRepository], T], key: Hashable = None) -> T | None:
        """`read`'s answer, or None when it must take the plain path instead."""
        if not self.available or self._closed:
            return None
        until = self._slow.get(key) if key is not None else None
        if until is not None:
            if until > time.monotonic():
                return None
            self._slow.pop(key, None)
        repository = self._repository()
        try:
            answer = read(repository)
        except OperationalError as exc:
            message = str(exc.orig).lower()
            if "interrupted" not in message and "locked" not in message and "busy" not in message:
                raise
            self.handed_back += 1
            if key is not None and "interrupted" in message:  # slow, not merely locked out
                if len(self._slow) >= _MAX_SLOW_KEYS:
                    self._slow.clear()
                self._slow[key] = time.monotonic() + SLOW_KEY_SECONDS
            return None
        self.answered += 1
        return answer

    def close(self) -> None:
        """Close every thread's connection: at shutdown, with no read in flight (a thread
        reading now would find its connection closed under it)."""
        with self._lock:
            self._closed = True
            engines, self._engines = self._engines, {}
        for engine, connection in engines.items():
            engine.dispose()
            connection.close()


class _InlineRepository(IndexRepository):
    """The index repository of one thread's inline connection: study searches run on the
    sqlite3 connection itself, other reads through SQLAlchemy on the same connection."""

    def __init__(
        self,
        engine: Engine,
        connection: sqlite3.Connection,
        start_clock: Callable[[], None],
        compiled: dict[Select[Any], tuple[SQLCompiler, _MakeRow]],
    ) -> None:
        super().__init__(engine)
        self._connection, self._start_clock, self._compiled = connection, start_clock, compiled

    def search_studies(self, query: StudyQuery) -> list[StudySummary]:
        """As the repository's, with the column values as SQLite returns them (the
        timestamps as text: a study summary reads none of them)."""
        statement, values = study_search(query)
        found = self._compiled.get(statement)
        if found is None:
            names = [column.name for column in statement.selected_columns]
            found = (
                statement.compile(dialect=self.engine.dialect),
                namedtuple("StudyRow", names)._make,  # type: ignore[attr-defined]
            )
            if len(self._compiled) >= _MAX_COMPILED:
                self._compiled.clear()
            self._compiled[statement] = found
        compiled, make_row = found
        expanded = compiled.construct_expanded_state(values)
        parameters = expanded.positional_parameters or ()
        self._start_clock()
        try:
            rows = self._connection.execute(expanded.statement, parameters).fetchall()
        except sqlite3.Error as exc:  # as SQLAlchemy raises it, for the callers' handlers
            raise DBAPIError.instance(expanded.statement, parameters, exc, sqlite3.Error) from exc
        return study_summaries(map(make_row, rows))


class _Held:
    """One thread's repository over its own connection."""

    __slots__ = ("__weakref__", "repository")

    def __init__(self, repository: IndexRepository) -> None:
        self.repository = repository


def _inline_now(request: Request) -> InlineReads | None:
    """The application's inline reads, when a read may run on the event loop now: not while
    a worker thread is busy (each step of the read would wait for the GIL)."""
    reads: InlineReads = request.app.state.inline_reads
    if not reads.available or anyio.to_thread.current_default_thread_limiter().borrowed_tokens:
        return None
    return reads


def read_now(request: Request, read: Callable[[IndexRepository], T], key: Hashable) -> T | None:
    """`read` answered inline, or None: then the caller takes its plain path (an API key
    whose lookup returns None here is authenticated in a worker thread, where failures are
    counted)."""
    reads = _inline_now(request)
    return None if reads is None else reads.run(read, key)


def _form(query: StudyQuery | SeriesQuery | InstanceQuery, scope: AccessScope) -> tuple[Any, ...]:
    """What a search matches on (not the values), whether with wildcards, and its scope's
    restrictions: searches of one form usually cost about the same."""
    used: list[str] = []
    wildcard = False
    for item in dataclasses.fields(query):
        value = getattr(query, item.name)
        if item.name in ("limit", "offset", "scope") or value in (None, "", (), False):
            continue
        used.append(item.name)
        wildcard = wildcard or any(c in str(value) for c in "*?")
    return (type(query).__name__, *used, wildcard, scope.shape)


async def answer_search(
    request: Request,
    index: IndexRepository,
    query: StudyQuery | SeriesQuery | InstanceQuery,
    scope: AccessScope,
    search: Callable[[IndexRepository], list[T]],
    answer: Callable[[list[T]], R],
    *,
    index_only: bool,
) -> R:
    """`answer(search(index))`: inline when the search may (`index_only`: it reads nothing
    but the index, and answers in JSON; a page of at most `INLINE_LIMIT`) and the index
    answers within the budget; else the plain path, search and answer in one worker thread.
    There a database that does not answer, or a pool with no free connection, stalls this
    request only."""
    if index_only and query.limit <= INLINE_LIMIT:
        found = read_now(request, search, _form(query, scope))
        if found is not None:
            if len(found) <= INLINE_ANSWER:
                return answer(found)
            return await anyio.to_thread.run_sync(answer, found)
    return await anyio.to_thread.run_sync(lambda: answer(search(index)))


# Stored objects ---------------------------------------------------------------------------
#: Objects opened ahead by one hand-off to a worker thread. Each holds a file descriptor
#: until it is sent, a slow client's too (`_DESCRIPTORS` caps how many are open at once).
OPEN_AHEAD = 16
#: Largest object read on the event loop from the page cache, and how much the loop reads
#: before it lets other requests run: larger objects are read in a worker thread.
LOOP_READ_MAX = 1 << 20


class _Descriptors:
    """The descriptors opened objects hold, capped: a slow client keeps its opened objects
    until it has taken them, and past the cap objects are read the plain way instead."""

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

    def close(self, file: io.FileIO) -> None:
        try:
            file.close()
        finally:
            self.release()


def _descriptor_cap() -> int:
    """A quarter of the process's descriptors (256 under systemd's default 1,024), 8 to 1,024."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 16
    return max(8, min(1024, soft // 4))


_DESCRIPTORS = _Descriptors(_descriptor_cap())


class OpenedObject:
    """A stored object opened for one read, its bytes not yet read: taken from the page cache
    on the event loop when it can be (`read_cached`), else read in a worker thread (`read`).
    Its descriptor is released by `close()`, or when the object is collected: a stream cut
    off early leaks nothing."""

    def __init__(self, key: str, file: io.FileIO, descriptors: _Descriptors) -> None:
        info = os.fstat(file.fileno())  # before the finalizer: on failure the caller closes
        self.key = key
        # Only a non-empty regular file's size is surely its length: a device says 0, and
        # so does a /proc file, regular or not.
        self.size: int | None = (
            info.st_size if stat.S_ISREG(info.st_mode) and info.st_size else None
        )
        self._fd = file.fileno()
        self._descriptors = descriptors
        self._closer = weakref.finalize(self, descriptors.close, file)

    def read_cached(self) -> memoryview | None:
        """The whole object if the page cache holds it all; None otherwise, never waiting."""
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
        """The whole object from its start, waiting for the disk if need be; StorageError on
        failure."""
        if not self._closer.alive:
            raise StorageError(f"object {self.key!r} read after close")
        chunks: list[bytes] = []
        offset = 0
        try:
            # A regular file in one read of its size; anything else to its end.
            while self.size is None or offset < self.size:
                chunk = os.pread(
                    self._fd, 1 << 20 if self.size is None else self.size - offset, offset
                )
                if not chunk:
                    break
                chunks.append(chunk)
                offset += len(chunk)
        except OSError as exc:
            raise StorageError(f"cannot read object {self.key!r}: {exc.strerror}") from exc
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def close(self) -> None:
        """Release the object (idempotent)."""
        self._closer()


def open_stored(store: ObjectStore, key: str, size: int) -> OpenedObject | None:
    """The object under `key` opened, to be read as it is sent (`multipart_body`), when the
    store is one of local files, a descriptor is free and the file has the indexed `size`;
    None otherwise: read it with `store.get` (ObjectNotFound either way when absent)."""
    if not isinstance(store, FilesystemObjectStore) or not _DESCRIPTORS.take():
        return None
    try:
        file = store.open(key)
    except BaseException:
        _DESCRIPTORS.release()
        raise
    try:
        opened = OpenedObject(key, file, _DESCRIPTORS)
    except BaseException:
        _DESCRIPTORS.close(file)
        raise
    if opened.size != size:  # stored again since it was indexed: parsed, not trusted
        opened.close()
        return None
    return opened


#: (content type, body, extra headers): a body may still be in its store, read as it is sent.
StreamedPart = tuple[str, bytes | OpenedObject, dict[str, str]]


def as_bytes(body: bytes | OpenedObject) -> bytes:
    """A part's body as bytes: an opened object is read (waiting on the disk if need be,
    so in a worker thread) and closed."""
    if isinstance(body, bytes):
        return body
    try:
        return body.read()
    finally:
        body.close()


async def multipart_body(
    parts: Iterable[StreamedPart], boundary: str, batch_bytes: int = 1 << 20
) -> AsyncIterator[bytes | memoryview]:
    """A multipart/related body for a streamed answer. The parts are produced (objects read
    or opened, converted) in a worker thread, a batch of about `batch_bytes` read, or
    `OPEN_AHEAD` objects opened, at a time: the plain path. An opened object's bytes are
    taken on the event loop when the page cache holds them, else in a worker thread with the
    opened objects after it, about `batch_bytes` per hand-off. Memory stays bounded by one
    batch plus one part; the event loop never waits on a disk, and lets other requests run
    after each `LOOP_READ_MAX` it reads."""
    pieces = multipart_pieces(parts, boundary)
    taken: collections.deque[bytes | OpenedObject] = collections.deque()
    # Objects read on the loop are closed by the next call in a worker thread: the last close
    # of a file deleted meanwhile frees its blocks, which may wait on the disk.
    done: list[OpenedObject] = []

    def close_done() -> None:
        while done:
            done.pop().close()

    def batch() -> list[bytes | OpenedObject]:
        close_done()
        found: list[bytes | OpenedObject] = []
        size = opened = 0
        try:
            for piece in pieces:
                found.append(piece)
                if isinstance(piece, bytes):
                    size += len(piece)
                else:
                    opened += 1
                if size >= batch_bytes or opened >= OPEN_AHEAD:
                    break
        except BaseException:  # a part that failed: the ones opened before it are let go now
            for piece in found:
                if not isinstance(piece, bytes):
                    piece.close()
            raise
        return found

    def read_run() -> list[bytes]:
        """In a worker thread: the opened object first in `taken` and the ones after it,
        up to about `batch_bytes`, read and closed (the heads between them kept): one
        hand-off for a run of objects the page cache did not have."""
        close_done()
        run: list[bytes] = []
        size = 0
        while taken and (not run or size < batch_bytes):
            run.append(as_bytes(taken.popleft()))
            size += len(run[-1])
        return run

    read_on_loop = 0
    try:
        while taken := collections.deque(await anyio.to_thread.run_sync(batch)):
            while taken:
                piece = taken[0]
                if isinstance(piece, bytes):
                    taken.popleft()
                    yield piece
                    continue
                cached = piece.read_cached() if (piece.size or 0) <= LOOP_READ_MAX else None
                if cached is None:  # `piece` stays in `taken` until read_run owns it
                    for body in await anyio.to_thread.run_sync(read_run):
                        yield body
                    continue
                taken.popleft()
                done.append(piece)
                yield cached
                read_on_loop += len(cached)
                if read_on_loop >= LOOP_READ_MAX:  # nothing above waited: let others run
                    read_on_loop = 0
                    await anyio.lowlevel.checkpoint()
    finally:  # a client gone mid-answer: what was opened ahead is released now
        for piece in [*done, *taken]:
            if not isinstance(piece, bytes):
                piece.close()


__all__ = [
    "INLINE_ANSWER",
    "INLINE_LIMIT",
    "LOOP_READ_MAX",
    "OPEN_AHEAD",
    "InlineReads",
    "OpenedObject",
    "StreamedPart",
    "answer_search",
    "as_bytes",
    "multipart_body",
    "open_stored",
    "read_now",
]
