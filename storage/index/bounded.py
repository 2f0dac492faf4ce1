"""Index reads on the calling thread within a time budget (SQLite).

A QIDO-RS search costs a tenth of a millisecond of SQL, but handing it to a worker thread
and back costs more than the query: two thread wake-ups, measured at 0.5 ms per request on a
2-vCPU virtual machine. An event loop must not wait on a database, though: one that does not
answer would stall every request. On SQLite the wait can be bounded, and this module bounds
it. Each thread gets its own read-only connection to the index file:

- no busy timeout: a database locked beyond what WAL readers ever see fails at once instead
  of waiting;
- a progress handler interrupts a statement that has run longer than the budget (SQLite's
  own time: building the statement and reading its rows are bounded by their size);
- `PRAGMA query_only`: nothing run here can write.

A read that fails either way returns None and the caller runs it in a worker thread as
before. A key (the caller's name for a form of read) that overran is sent to the worker
thread directly for a while, so a slow form of search does not spend the budget on the event
loop at every request. The budget counts SQLite's own time; a caller should not read here
while other threads are busy: sqlite3 gives up the GIL at every step and must take it back
to check the clock, so busy threads can stretch a read far past its budget. PostgreSQL,
in-memory SQLite and a budget of 0 are never read here (`available` is False).

Study searches, the most frequent, skip SQLAlchemy's execution layer here: their statement is
compiled once per form and run on the sqlite3 connection itself. The statement's cache key,
the pool checkout and the result rows cost 0.15 ms, five times the query.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import weakref
from collections import namedtuple
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql.compiler import SQLCompiler

from storage.index.repository import IndexRepository, _study_search_statement

T = TypeVar("T")
#: A study search row (a namedtuple) from its column values.
_MakeRow = Callable[[Iterable[Any]], tuple[Any, ...]]

#: SQLite virtual machine steps between two looks at the clock.
_STEPS_PER_CHECK = 1000
#: How long a key that overran goes straight to the worker thread.
SLOW_KEY_SECONDS = 60.0
_MAX_SLOW_KEYS = 1024
#: Study search forms kept compiled (the repository caches 512 statements).
_MAX_COMPILED = 256


def _on_disk(engine: Engine) -> bool:
    database = engine.url.database or ""
    return (
        engine.dialect.name == "sqlite"
        and database not in ("", ":memory:")
        and "mode=memory" not in database
        and not database.startswith("file::memory:")
    )


class BoundedReads:
    """`run(read)` answers `read(repository)` on this thread within `budget_seconds`, or
    returns None (budget spent, database busy, not SQLite): then run it elsewhere."""

    def __init__(self, engine: Engine, budget_seconds: float) -> None:
        self.budget = budget_seconds
        self.available = budget_seconds > 0 and _on_disk(engine)
        self._url = engine.url
        self._local = threading.local()
        self._engines: dict[Engine, sqlite3.Connection] = {}
        self._lock = threading.Lock()
        self._slow: dict[Hashable, float] = {}
        self._closed = False
        #: Study search statements compiled for this database, by form.
        self._compiled: dict[Any, tuple[SQLCompiler, _MakeRow]] = {}
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
        held = _Held(_DirectRepository(engine, connection, start_clock, self._compiled))
        with self._lock:
            if self._closed:
                engine.dispose()
                connection.close()
                raise RuntimeError("bounded reads are closed")
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
        """`read`'s answer, or None when it must run in a worker thread instead."""
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


class _DirectRepository(IndexRepository):
    """The index repository of one thread's bounded connection: study searches run on the
    sqlite3 connection itself, other reads through SQLAlchemy on the same connection."""

    def __init__(
        self,
        engine: Engine,
        connection: sqlite3.Connection,
        start_clock: Callable[[], None],
        compiled: dict[Any, tuple[SQLCompiler, _MakeRow]],
    ) -> None:
        super().__init__(engine)
        self._connection, self._start_clock, self._compiled = connection, start_clock, compiled

    def _study_rows(self, shape: Any, values: dict[str, Any]) -> Sequence[Any]:
        """As SQLAlchemy's rows, but with the column values as SQLite returns them (the
        timestamps as text: a study search reads none of them)."""
        found = self._compiled.get(shape)
        if found is None:
            statement = _study_search_statement(shape)
            names = [column.name for column in statement.selected_columns]
            found = (
                statement.compile(dialect=self.engine.dialect),
                namedtuple("StudyRow", names)._make,  # type: ignore[attr-defined]
            )
            if len(self._compiled) >= _MAX_COMPILED:
                self._compiled.clear()
            self._compiled[shape] = found
        compiled, make_row = found
        expanded = compiled.construct_expanded_state(values)
        parameters = expanded.positional_parameters or ()
        self._start_clock()
        try:
            rows = self._connection.execute(expanded.statement, parameters).fetchall()
        except sqlite3.Error as exc:  # as SQLAlchemy raises it, for the callers' handlers
            raise DBAPIError.instance(expanded.statement, parameters, exc, sqlite3.Error) from exc
        return [make_row(columns) for columns in rows]


class _Held:
    """One thread's repository over its own connection."""

    __slots__ = ("__weakref__", "repository")

    def __init__(self, repository: IndexRepository) -> None:
        self.repository = repository


__all__ = ["BoundedReads"]
