"""Index reads on the calling thread within a time budget (storage.index.bounded): answered
when quick, interrupted when slow, never waiting on a lock, never writing."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from storage import (
    MAX_FUZZY_WORDS,
    AccessScope,
    BoundedReads,
    DateRange,
    IndexRepository,
    StudyQuery,
    create_index_engine,
    migrate,
)
from storage.index import bounded
from storage.index.repository import _study_plan
from tests.support.index_records import study_records
from web_viewer_api.deps import read_inline

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
def quick(index: IndexRepository) -> Iterator[BoundedReads]:
    reads = BoundedReads(index.engine, 0.05)
    yield reads
    reads.close()


def _slow(repository: IndexRepository) -> int:
    with repository.engine.connect() as connection:
        return int(connection.scalar(text(_SLOW)) or 0)


def test_a_quick_search_is_answered_on_the_calling_thread(index: IndexRepository,
                                                          quick: BoundedReads) -> None:
    assert quick.available
    expected = index.search_studies(StudyQuery(patient_id="PAAA"))
    found = quick.run(lambda r: (threading.get_ident(), r.search_studies(StudyQuery(patient_id="PAAA"))))
    assert found == (threading.get_ident(), expected)
    assert [s.number_of_instances for s in expected] == [3]
    assert (quick.answered, quick.handed_back) == (1, 0)


def test_a_search_over_budget_is_interrupted_and_its_form_sent_to_the_thread(
        quick: BoundedReads, monkeypatch: pytest.MonkeyPatch) -> None:
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
    monkeypatch.setattr(bounded, "SLOW_KEY_SECONDS", 0.0)
    assert quick.run(_slow, key="again") is None
    assert quick.run(lambda r: len(r.search_studies(StudyQuery())), key="again") == 2


def test_a_locked_database_is_handed_back_at_once(index: IndexRepository, quick: BoundedReads,
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


def test_nothing_is_written_through_a_bounded_read(index: IndexRepository, quick: BoundedReads) -> None:
    with pytest.raises(OperationalError, match="readonly"):
        quick.run(lambda r: r.upsert_instances(study_records("2.25.300", "PCCC")))
    assert len(index.search_studies(StudyQuery())) == 2


def test_only_an_index_file_is_read_inline(index: IndexRepository, tmp_path: Path,
                                           postgres_url: str) -> None:
    memory = create_index_engine("sqlite://")
    postgres = create_index_engine(postgres_url)
    try:
        for reads in (BoundedReads(memory, 1.0), BoundedReads(postgres, 1.0),
                      BoundedReads(index.engine, 0.0)):
            assert not reads.available
            assert reads.run(lambda r: pytest.fail("read inline")) is None
    finally:
        memory.dispose()
        postgres.dispose()


def test_each_thread_reads_through_its_own_connection(quick: BoundedReads) -> None:
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
        index: IndexRepository, quick: BoundedReads, tmp_path: Path) -> None:
    assert quick.run(_slow) is None
    index.upsert_instances(study_records("2.25.300", "PCCC"))  # a write appends to the WAL
    with index.engine.connect() as connection:
        busy, _log, _done = connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
    assert busy == 0  # no reader pins an old snapshot
    assert (tmp_path / "index.sqlite3-wal").stat().st_size == 0


def test_a_lock_is_no_reason_to_send_a_form_to_the_thread(index: IndexRepository, quick: BoundedReads,
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


def test_a_threads_connection_is_closed_when_the_thread_ends(quick: BoundedReads, tmp_path: Path) -> None:
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


def test_nothing_is_read_on_the_event_loop_while_a_worker_thread_is_busy(quick: BoundedReads) -> None:
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(quick_reads=quick)))

    async def check() -> None:
        assert read_inline(request) is quick  # type: ignore[arg-type]
        async with anyio.to_thread.current_default_thread_limiter():  # a thread at work
            assert read_inline(request) is None  # type: ignore[arg-type]
        assert read_inline(request) is quick  # type: ignore[arg-type]

    anyio.run(check)


def test_study_searches_answer_alike_on_the_bounded_connection(index: IndexRepository,
                                                               quick: BoundedReads) -> None:
    """Study searches skip SQLAlchemy's execution there: every form gives the same rows."""
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


def test_a_study_search_interrupted_on_the_bounded_connection_is_handed_back(
        index: IndexRepository, monkeypatch: pytest.MonkeyPatch) -> None:
    """Study searches run on the sqlite3 connection itself: its errors still read as
    SQLAlchemy's, so an interrupt is a hand-back and other failures keep their 503."""
    monkeypatch.setattr(bounded, "_STEPS_PER_CHECK", 1)  # look at the clock at every step
    reads = BoundedReads(index.engine, 1e-9)
    try:
        assert reads.run(lambda r: r.search_studies(StudyQuery(patient_id="PAAA"))) is None
        assert reads.handed_back == 1
    finally:
        reads.close()


def test_a_fuzzy_name_matches_on_its_first_words_only() -> None:
    name = " ".join(f"W{n}" for n in range(MAX_FUZZY_WORDS + 5))
    _shape, values = _study_plan(StudyQuery(patient_name=name, fuzzy_person_names=True))
    assert sum(key.startswith("name_word_") for key in values) == MAX_FUZZY_WORDS
