"""Engine creation and schema migration for the index (SQLite or PostgreSQL)."""

from __future__ import annotations

import logging
import os
import stat
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

#: The index file and SQLite's companions (which SQLite creates with the main file's mode).
_SQLITE_COMPANIONS = ("", "-wal", "-shm", "-journal")


def _close_sqlite_file(database_url: str) -> None:
    """Create the SQLite index file 0600 before SQLite does (it would follow the umask:
    0644), and tighten an index and companions an older version left readable by others.
    The index holds shares, API key hashes and the audit trail: its owner only."""
    url = make_url(database_url)
    database = url.database
    if (
        not database
        or database == ":memory:"
        or database.startswith("file:")
        or url.query.get("uri")
    ):
        return
    path = Path(database)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass
    except FileNotFoundError:
        return  # no such folder: SQLite says so at the first connection, as before
    for suffix in _SQLITE_COMPANIONS:
        companion = path.with_name(path.name + suffix)
        try:
            if stat.S_IMODE(companion.stat().st_mode) & 0o077:
                os.chmod(companion, 0o600)
        except FileNotFoundError:
            continue
        except PermissionError:  # another user's file: we cannot close it, say so
            log.warning(
                "index file %s is readable by other users and not ours to chmod", companion.name
            )


def create_index_engine(database_url: str, *, echo: bool = False, pooled: bool = True) -> Engine:
    """An engine tuned for the index: WAL and a busy timeout on SQLite, pre-ping everywhere.
    A SQLite index file is created (or tightened to) mode 0600. Not `pooled`: each use
    opens and closes its connection (a process that forks others keeps none open)."""
    kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": True}
    if not pooled:
        kwargs["poolclass"] = NullPool
    if database_url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        _close_sqlite_file(database_url)
    engine = create_engine(database_url, **kwargs)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL lets the API read while a worker writes; several processes share the file.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

    return engine


def _alembic_config() -> Config:
    config = Config()
    location = resources.files("storage.index").joinpath("migrations")
    config.set_main_option("script_location", str(location))
    return config


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` with the packaged Alembic migrations."""
    config = _alembic_config()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Several components may start at once: one migrates, the others wait.
            connection.execute(text("SELECT pg_advisory_xact_lock(7202611230001)"))
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Step the schema back to `revision` (used by the migration tests)."""
    config = _alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)
