"""Reads on the event loop (web_viewer_api.loop_reads). Index reads within a time budget:
answered when quick, interrupted when slow, never waiting on a lock, never writing. Stored
objects from the page cache: never waiting on the disk, descriptors capped and released. Both
give the same answers as the plain path (a worker thread)."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from storage import (
    MAX_FUZZY_WORDS,
    AccessScope,
    DateRange,
    FilesystemObjectStore,
    IndexRepository,
    ObjectNotFound,
    StorageError,
    StudyQuery,
    create_index_engine,
    migrate,
)
from storage.index.repository import _study_plan
from tests.support.index_records import study_records
from tests.support.page_cache import opened_under, page_cache_reads_work
from web_viewer_api import loop_reads
from web_viewer_api.loop_reads import InlineReads, OpenedObject, open_stored, read_now

#: A query SQLite needs many seconds for: counting to 10^8 through a recursive CTE.
_SLOW = ("WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 100000000) "
         "SELECT count(*) FROM n")


@pytest.fixture
def index(tmp_path: Path) -> Iterator[IndexRepository]:
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    migrate(engine)
    repository = IndexRepository(engine)
    repository.upsert_instances(study_records("2.25.100", "PAAA", count=3))
    repository.upsert_instances(study_records("2.25.200", "PBBB", count=2))
    yield repository
    engine.dispose()


@pytest.fixture
def quick(index: IndexRepository) -> Iterator[InlineReads]:
    reads = InlineReads(index.engine, 0.05)
    yield reads
    reads.close()


def _slow(repository: IndexRepository) -> int:
    with repository.engine.connect() as connection:
        return int(connection.scalar(text(_SLOW)) or 0)


def test_a_quick_search_is_answered_on_the_calling_thread(index: IndexRepository,
                                                          quick: InlineReads) -> None:
    assert quick.available
    expected = index.search_studies(StudyQuery(patient_id="PAAA"))
    found = quick.run(lambda r: (threading.get_ident(), r.search_studies(StudyQuery(patient_id="PAAA"))))
    assert found == (threading.get_ident(), expected)
    assert [s.number_of_instances for s in expected] == [3]
    assert (quick.answered, quick.handed_back) == (1, 0)


def test_a_search_over_budget_is_interrupted_and_its_form_sent_to_the_thread(
        quick: InlineReads, monkeypatch: pytest.MonkeyPatch) -> None:
    started = time.perf_counter()
    assert quick.run(_slow, key="slow form") is None
    assert time.perf_counter() - started < 2  # the whole count takes many seconds
    assert quick.handed_back == 1
    # The same form now goes to the worker thread without being tried; other forms still run.
    calls: list[str] = []
    assert quick.run(lambda r: calls.append("slow form"), key="slow form") is None
    assert quick.run(lambda r: r.search_studies(StudyQuery(patient_id="PBBB")), key="other")
    assert calls == []
    # The interrupted connection still answers, and a form is tried again once its time is up.
    monkeypatch.setattr(loop_reads, "SLOW_KEY_SECONDS", 0.0)
    assert quick.run(_slow, key="again") is None
    assert quick.run(lambda r: len(r.search_studies(StudyQuery())), key="again") == 2


def test_a_locked_database_is_handed_back_at_once(index: IndexRepository, quick: InlineReads,
                                                 tmp_path: Path) -> None:
    index.engine.dispose()  # an exclusive lock on a WAL database needs it to be the only one open
    locker = sqlite3.connect(tmp_path / "index.sqlite3", isolation_level=None)
    locker.execute("PRAGMA locking_mode=EXCLUSIVE")
    locker.execute("BEGIN EXCLUSIVE")
    try:
        started = time.perf_counter()
        assert quick.run(lambda r: r.search_studies(StudyQuery())) is None
        assert time.perf_counter() - started < 1  # the index engine itself would wait 30 s
    finally:
        locker.close()
    assert [s.study_instance_uid for s in quick.run(lambda r: r.search_studies(StudyQuery())) or []] \
        == [s.study_instance_uid for s in index.search_studies(StudyQuery())]


def test_nothing_is_written_through_an_inline_read(index: IndexRepository, quick: InlineReads) -> None:
    with pytest.raises(OperationalError, match="readonly"):
        quick.run(lambda r: r.upsert_instances(study_records("2.25.300", "PCCC")))
    assert len(index.search_studies(StudyQuery())) == 2


def test_only_an_index_file_is_read_inline(index: IndexRepository, tmp_path: Path,
                                           postgres_url: str) -> None:
    memory = create_index_engine("sqlite://")
    postgres = create_index_engine(postgres_url)
    try:
        for reads in (InlineReads(memory, 1.0), InlineReads(postgres, 1.0),
                      InlineReads(index.engine, 0.0)):
            assert not reads.available
            assert reads.run(lambda r: pytest.fail("read inline")) is None
    finally:
        memory.dispose()
        postgres.dispose()


def test_each_thread_reads_through_its_own_connection(quick: InlineReads) -> None:
    connections: list[int] = []
    together = threading.Barrier(3)

    def read() -> None:
        def which(repository: IndexRepository) -> int:
            with repository.engine.connect() as connection:
                return id(connection.connection.dbapi_connection)
        connections.append(quick.run(which) or 0)
        together.wait(timeout=10)  # all three threads are alive at once

    threads = [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(connections)) == 3 and 0 not in connections


def test_an_interrupted_read_leaves_no_snapshot_holding_the_wal_back(
        index: IndexRepository, quick: InlineReads, tmp_path: Path) -> None:
    assert quick.run(_slow) is None
    index.upsert_instances(study_records("2.25.300", "PCCC"))  # a write appends to the WAL
    with index.engine.connect() as connection:
        busy, _log, _done = connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
    assert busy == 0  # no reader pins an old snapshot
    assert (tmp_path / "index.sqlite3-wal").stat().st_size == 0


def test_a_lock_is_no_reason_to_send_a_form_to_the_thread(index: IndexRepository, quick: InlineReads,
                                                          tmp_path: Path) -> None:
    index.engine.dispose()
    locker = sqlite3.connect(tmp_path / "index.sqlite3", isolation_level=None)
    locker.execute("PRAGMA locking_mode=EXCLUSIVE")
    locker.execute("BEGIN EXCLUSIVE")
    try:
        assert quick.run(lambda r: r.search_studies(StudyQuery()), key="form") is None
    finally:
        locker.close()
    assert quick.run(lambda r: len(r.search_studies(StudyQuery())), key="form") == 2


def _open_files(path: Path) -> int:
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str(path))


def test_a_threads_connection_is_closed_when_the_thread_ends(quick: InlineReads, tmp_path: Path) -> None:
    database = (tmp_path / "index.sqlite3").resolve()

    def in_threads(count: int) -> int:
        for _ in range(count):
            thread = threading.Thread(target=lambda: quick.run(lambda r: r.search_studies(StudyQuery())))
            thread.start()
            thread.join()
        return _open_files(database)

    # SQLite may keep one closed descriptor of the file for reuse (POSIX locks are per
    # process): the count after one thread is the count after many.
    once = in_threads(1)
    assert in_threads(5) == once
    assert quick.answered == 6


def test_nothing_is_read_on_the_event_loop_while_a_worker_thread_is_busy(quick: InlineReads) -> None:
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(inline_reads=quick)))

    def count(repository: IndexRepository) -> int:
        return len(repository.search_studies(StudyQuery()))

    async def check() -> None:
        assert read_now(request, count, "count") == 2  # type: ignore[arg-type]
        async with anyio.to_thread.current_default_thread_limiter():  # a thread at work
            assert read_now(request, count, "count") is None  # type: ignore[arg-type]
        assert read_now(request, count, "count") == 2  # type: ignore[arg-type]

    anyio.run(check)
    assert quick.answered == 2


def test_study_searches_answer_alike_inline_and_by_the_plain_path(index: IndexRepository,
                                                                  quick: InlineReads) -> None:
    """Study searches skip SQLAlchemy's execution inline (their statement compiled once, run
    on the sqlite3 connection): every form gives the same studies as the plain path."""
    index.upsert_instances(study_records("2.25.300", "PAAA", "20240229", "MR", 2))
    index.upsert_instances(study_records("2.25.400", "P_%X", "20231231", "US", 1))
    limited = AccessScope(series_limits={"2.25.300": frozenset({"2.25.300.9"})})
    queries = [
        StudyQuery(), StudyQuery(patient_id="PAAA"), StudyQuery(patient_id="P?A*"),
        StudyQuery(patient_id="P_%X"), StudyQuery(patient_name="anonymous^p*"),
        StudyQuery(patient_name="paaa", fuzzy_person_names=True),
        StudyQuery(study_date=DateRange.parse("20240101-")), StudyQuery(study_date=DateRange.parse("-20240101")),
        StudyQuery(study_instance_uids=("2.25.100", "2.25.400", "2.25.999")),
        StudyQuery(modalities=("MR", "US")), StudyQuery(limit=1, offset=1), StudyQuery(offset=10),
        StudyQuery(scope=AccessScope(site_ids=frozenset({"site1"}))),
        StudyQuery(scope=AccessScope(site_ids=frozenset({"elsewhere"}))),
        StudyQuery(scope=AccessScope(study_instance_uids=frozenset({"2.25.200", "2.25.300"}))),
        StudyQuery(scope=limited), StudyQuery(modalities=("MR",), scope=limited),
    ]
    for query in queries:
        assert quick.run(lambda r, q=query: r.search_studies(q)) == index.search_studies(query), query
    assert quick.answered == len(queries)
    assert [s.number_of_instances for s in index.search_studies(StudyQuery(scope=limited))
            if s.study_instance_uid == "2.25.300"] == [0]  # the limit really applies


def test_a_study_search_interrupted_inline_is_handed_back(
        index: IndexRepository, monkeypatch: pytest.MonkeyPatch) -> None:
    """Study searches run on the sqlite3 connection itself: its errors still read as
    SQLAlchemy's, so an interrupt is a hand-back and other failures keep their 503."""
    monkeypatch.setattr(loop_reads, "_STEPS_PER_CHECK", 1)  # look at the clock at every step
    reads = InlineReads(index.engine, 1e-9)
    try:
        assert reads.run(lambda r: r.search_studies(StudyQuery(patient_id="PAAA"))) is None
        assert reads.handed_back == 1
    finally:
        reads.close()


def test_series_instance_and_key_reads_answer_alike_inline_and_by_the_plain_path(
        index: IndexRepository, quick: InlineReads) -> None:
    """Series and instance searches and an API key's lookup: the same answers on the inline
    connection as on the application's index."""
    import datetime as dt

    from storage import AccessRepository, ApiKeyRecord, InstanceQuery, SeriesQuery

    index.upsert_instances(study_records("2.25.300", "PAAA", "20240229", "MR", 2))
    AccessRepository(index.engine).add_api_key(ApiKeyRecord(
        "k1", "test", frozenset({"read"}), frozenset({"site1"}),
        dt.datetime(2026, 1, 1, tzinfo=dt.UTC), None, "0" * 64))
    limited = AccessScope(study_instance_uids=frozenset({"2.25.300"}))
    reads: list[Callable[[IndexRepository], object]] = [
        lambda r: r.search_series(SeriesQuery()),
        lambda r: r.search_series(SeriesQuery(study_instance_uid="2.25.100", modality="CT")),
        lambda r: r.search_series(SeriesQuery(scope=limited)),
        lambda r: r.search_instances(InstanceQuery(study_instance_uid="2.25.300")),
        lambda r: r.search_instances(InstanceQuery(sop_instance_uids=("2.25.100.1.2",), limit=1)),
        lambda r: r.search_instances(InstanceQuery(scope=limited, offset=1)),
        lambda r: AccessRepository(r.engine).api_key("k1"),
        lambda r: AccessRepository(r.engine).api_key("unknown"),
    ]
    for number, read in enumerate(reads):
        assert quick.run(read) == read(index), number
    assert quick.answered == len(reads)


def _request(quick: InlineReads) -> Any:
    return SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(inline_reads=quick)))


def test_a_search_is_answered_inline_when_it_may_and_else_by_the_plain_path_alike(
        index: IndexRepository, quick: InlineReads) -> None:
    """`answer_search`: on the event loop's thread when the search reads the index alone and
    pages at most INLINE_LIMIT; else search and answer together in a worker thread, over the
    index it was given. The answers are the same."""
    from web_viewer_api.loop_reads import INLINE_LIMIT, answer_search

    threads: list[tuple[str, int]] = []

    def search(repository: IndexRepository) -> list[str]:
        threads.append(("search", threading.get_ident()))
        return [s.study_instance_uid for s in repository.search_studies(StudyQuery())]

    def answer(found: list[str]) -> list[str]:
        threads.append(("answer", threading.get_ident()))
        return found

    async def both(query: StudyQuery, index_only: bool) -> list[str]:
        return await answer_search(_request(quick), index, query, AccessScope(), search, answer,
                                   index_only=index_only)

    loop_thread = threading.get_ident()
    inline = anyio.run(both, StudyQuery(), True)
    assert threads == [("search", loop_thread), ("answer", loop_thread)]
    assert sorted(inline) == ["2.25.100", "2.25.200"]
    for query, index_only in ((StudyQuery(), False), (StudyQuery(limit=INLINE_LIMIT + 1), True)):
        threads.clear()
        assert anyio.run(both, query, index_only) == inline
        [(_, searched), (_, answered)] = threads
        assert searched == answered != loop_thread  # both in one worker thread
    assert (quick.answered, quick.handed_back) == (1, 0)


def test_a_fuzzy_name_matches_on_its_first_words_only() -> None:
    name = " ".join(f"W{n}" for n in range(MAX_FUZZY_WORDS + 5))
    _shape, values = _study_plan(StudyQuery(patient_name=name, fuzzy_person_names=True))
    assert sum(key.startswith("name_word_") for key in values) == MAX_FUZZY_WORDS


# Stored objects ---------------------------------------------------------------------------
def _opened(store: FilesystemObjectStore, key: str,
            descriptors: loop_reads._Descriptors | None = None) -> OpenedObject:
    return OpenedObject(key, store.open(key), descriptors or loop_reads._Descriptors(8))


def test_an_opened_object_reads_from_the_page_cache_without_waiting_and_else_from_disk(
        tmp_path: Path) -> None:
    """Cached: `read_cached` gives the bytes. Evicted from the page cache: it gives None at
    once (a read would wait for the disk) and `read` gives the bytes."""
    if not page_cache_reads_work(tmp_path):
        pytest.skip("this file system refuses RWF_NOWAIT reads (tmpfs?)")
    store = FilesystemObjectStore(tmp_path / "objects")
    body = os.urandom(3 << 20)
    store.put("studies/1.2/a.dcm", body)
    opened = open_stored(store, "studies/1.2/a.dcm", len(body))
    assert opened is not None
    try:
        assert opened.size == len(body)
        cached = opened.read_cached()
        assert cached is not None and bytes(cached) == body
        with open(tmp_path / "objects" / "studies" / "1.2" / "a.dcm", "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # written and fsynced: clean pages
        assert opened.read_cached() is None
        assert opened.read() == body
        assert opened.read() == body  # from the start again
        assert bytes(opened.read_cached() or b"") == body  # read() brought it back
    finally:
        opened.close()


def test_an_opened_object_that_is_not_a_plain_file_is_read_in_full_or_fails_loudly(tmp_path: Path) -> None:
    """A /proc file says it is empty: it is not taken from the cache as an empty object;
    reading it fails with a StorageError. `open_stored` opens only what has the indexed
    size, and nothing absent."""
    store = FilesystemObjectStore(tmp_path / "objects")
    store.put("studies/1.2/a.dcm", b"DICM")
    os.symlink("/proc/self/mem", tmp_path / "objects" / "studies" / "1.2" / "mem.dcm")  # reading it: EIO
    opened = _opened(store, "studies/1.2/mem.dcm")
    try:
        assert opened.size is None and opened.read_cached() is None
        with pytest.raises(StorageError, match="cannot read object"):
            opened.read()
    finally:
        opened.close()
    assert open_stored(store, "studies/1.2/mem.dcm", 4) is None
    assert open_stored(store, "studies/1.2/a.dcm", 5) is None  # stored again since indexed
    with pytest.raises(ObjectNotFound):
        open_stored(store, "studies/1.2", 4)
    with pytest.raises(ObjectNotFound):
        open_stored(store, "studies/1.2/missing.dcm", 4)
    assert opened_under(tmp_path) == 0


def test_an_opened_object_releases_its_descriptor_when_closed_or_dropped(tmp_path: Path) -> None:
    store = FilesystemObjectStore(tmp_path / "objects")
    store.put("studies/1.2/a.dcm", b"DICM")
    opened = open_stored(store, "studies/1.2/a.dcm", 4)
    assert opened is not None and opened_under(tmp_path) == 1
    opened.close()
    opened.close()  # idempotent
    assert opened_under(tmp_path) == 0
    with pytest.raises(StorageError, match="after close"):
        opened.read()
    assert opened.read_cached() is None
    dropped = open_stored(store, "studies/1.2/a.dcm", 4)
    assert opened_under(tmp_path) == 1
    del dropped  # a stream cut off early: the last reference goes
    assert opened_under(tmp_path) == 0


def test_a_file_system_refusing_page_cache_reads_is_not_asked_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tmpfs, NFS or FUSE answer EOPNOTSUPP to RWF_NOWAIT: it is not tried again (each try
    allocates a buffer on the event loop for nothing) and objects are read the usual way."""
    import errno

    monkeypatch.setattr(loop_reads, "_DESCRIPTORS", loop_reads._Descriptors(8))
    store = FilesystemObjectStore(tmp_path / "objects")
    store.put("studies/1.2/a.dcm", b"DICM" * 1000)
    calls: list[int] = []

    def refused(*_args: object) -> int:
        calls.append(1)
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "preadv", refused)
    for _ in range(3):
        opened = open_stored(store, "studies/1.2/a.dcm", 4000)
        assert opened is not None
        assert opened.read_cached() is None
        assert opened.read() == b"DICM" * 1000
        opened.close()
    assert len(calls) == 1


def test_at_most_the_cap_of_objects_is_kept_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the cap `open_stored` answers None (the caller reads the object instead); each
    object closed, or dropped, makes room again. A refused or failed open takes no room."""
    monkeypatch.setattr(loop_reads, "_DESCRIPTORS", loop_reads._Descriptors(2))
    store = FilesystemObjectStore(tmp_path / "objects")
    store.put("studies/1.2/a.dcm", b"DICM")
    with pytest.raises(ObjectNotFound):
        open_stored(store, "studies/1.2/missing.dcm", 4)
    assert open_stored(store, "studies/1.2/a.dcm", 5) is None  # wrong size: closed again
    first, second = open_stored(store, "studies/1.2/a.dcm", 4), open_stored(store, "studies/1.2/a.dcm", 4)
    assert first is not None and second is not None
    assert open_stored(store, "studies/1.2/a.dcm", 4) is None
    assert opened_under(tmp_path) == 2
    first.close()
    third = open_stored(store, "studies/1.2/a.dcm", 4)
    assert third is not None
    del second
    assert open_stored(store, "studies/1.2/a.dcm", 4) is not None


def test_objects_of_other_stores_are_not_opened(tmp_path: Path) -> None:
    """Only a store of local files is read from the page cache; any other is read with
    `get`, in a worker thread (the plain path)."""
    class Remote:
        def get(self, key: str) -> bytes:
            raise AssertionError("not read here")

    assert open_stored(Remote(), "studies/1.2/a.dcm", 4) is None  # type: ignore[arg-type]


def test_an_answer_is_the_same_from_the_page_cache_as_by_the_plain_path(tmp_path: Path) -> None:
    """The same parts, once as opened objects (read on the loop or in a thread) and once as
    bytes read by the plain path: the same body, byte for byte."""
    from web_viewer_api.loop_reads import multipart_body

    store = FilesystemObjectStore(tmp_path / "objects")
    bodies = [os.urandom(size) for size in (10, 300_000, 2 << 20, 700_000, 1)]
    for number, body in enumerate(bodies):
        store.put(f"studies/1.2/{number}.dcm", body)

    def parts(opened: bool) -> Iterator[loop_reads.StreamedPart]:
        for number, body in enumerate(bodies):
            key = f"studies/1.2/{number}.dcm"
            found = open_stored(store, key, len(body)) if opened else None
            yield ("application/dicom", found if found is not None else store.get(key), {})

    async def whole(opened: bool) -> bytes:
        pieces = multipart_body(parts(opened), "b0c1d2e3f4a5b6c7d8e9")
        return b"".join([bytes(piece) async for piece in pieces])

    assert anyio.run(whole, True) == anyio.run(whole, False)
    assert anyio.run(whole, False).count(b"--b0c1d2e3f4a5b6c7d8e9") == len(bodies) + 1
    assert opened_under(tmp_path) == 0
