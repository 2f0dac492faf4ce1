"""The two columns a pipeline test runs on: SQLite + filesystem objects ("embedded"), and
PostgreSQL + a real S3 server, SeaweedFS ("production")."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine

from storage import FilesystemObjectStore, ObjectStore, S3ObjectStore, create_index_engine, migrate
from tests.support.seaweedfs import SeaweedFS

COLUMNS = ["embedded", "production"]


def index_engine_and_store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Engine, ObjectStore]:
    """A migrated index engine and an object store of the column `request.param` names
    (the production one from the session's PostgreSQL and SeaweedFS fixtures)."""
    store: ObjectStore
    if request.param == "embedded":
        engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
        store = FilesystemObjectStore(tmp_path / "objects")
    else:
        engine = create_index_engine(request.getfixturevalue("create_postgres_database")())
        seaweedfs: SeaweedFS = request.getfixturevalue("seaweedfs")
        store = S3ObjectStore(request.getfixturevalue("s3_bucket"), endpoint_url=seaweedfs.endpoint_url,
                              region=seaweedfs.region, access_key=seaweedfs.access_key,
                              secret_key=seaweedfs.secret_key)
    migrate(engine)
    return engine, store
