"""Fixtures that start or reach real services: PostgreSQL, Redis, SeaweedFS, dcmtk.

A missing service fails the test run (it is never skipped): `make test` installs and
starts what is missing.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest
import redis

from gateway.sample_study import SampleStudySpec, write_sample_study
from tests.support.seaweedfs import SeaweedFS

POSTGRES_ADMIN_URL = os.environ.get(
    "DGW_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("DGW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TEST_SECRET = "test-pseudonym-secret-0123456789abcdef"
TEST_TOKEN = "test-admin-token-0123456789abcdef"


@pytest.fixture(scope="session")
def create_postgres_database() -> Iterator[Callable[[], str]]:
    """Create throwaway PostgreSQL databases; all are dropped at the end of the session."""
    admin = psycopg2.connect(POSTGRES_ADMIN_URL)
    admin.autocommit = True
    created: list[str] = []
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].split("://", 1)[1]

    def create() -> str:
        name = f"dgw_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return f"postgresql+psycopg2://{base}/{name}"

    try:
        yield create
    finally:
        with admin.cursor() as cursor:
            for name in created:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def postgres_url(create_postgres_database: Callable[[], str]) -> str:
    """One throwaway PostgreSQL database shared by this session's index tests."""
    return create_postgres_database()


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    client.close()
    return REDIS_URL


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with SeaweedFS(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_bucket(seaweedfs: SeaweedFS) -> str:
    name = f"dgw-{uuid.uuid4().hex[:12]}"
    seaweedfs.create_bucket(name)
    return name


@pytest.fixture(scope="session")
def dcmtk() -> dict[str, str]:
    tools = {}
    for tool in ("storescu", "echoscu", "findscu", "movescu", "getscu", "storescp"):
        path = shutil.which(tool)
        if path is None:
            pytest.fail(f"dcmtk's {tool} is not installed: run `make test` (it installs dcmtk)")
        tools[tool] = path
    return tools


@pytest.fixture(scope="session")
def sample_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SampleStudySpec]:
    """A small real-size study: 8 CT (512x512, 16-bit) + 4 MR (256x256)."""
    spec = SampleStudySpec(ct_slices=8, mr_slices=4)
    out = tmp_path_factory.mktemp("sample-study")
    write_sample_study(out, spec)
    return out, spec


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The common default umask, explicitly: files 0644 and folders 0755 unless we say."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


#: Fixtures that reach a service or an outside program: a test using one is not "fast".
_SERVICE_FIXTURES = frozenset({"create_postgres_database", "postgres_url", "redis_url",
                               "seaweedfs", "s3_bucket", "dcmtk", "browser"})


#: The suites that run the gateway whole (its processes, a browser, faults, fuzzing); the
#: other folders mirror the packages (tests/imaging, tests/storage...) and hold their tests.
_SYSTEM_SUITES = frozenset({"integration", "e2e", "faults", "fuzz"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `fast` the unit tests that need no service (the production column and S3
    included) and are not marked `slow` (they start the CLI, or take seconds):
    `make test-fast`, `pytest -m fast`, a first check in under a minute."""
    for item in items:
        path = Path(str(item.fspath))
        if (not _SYSTEM_SUITES & set(path.parts)
                and "[production" not in item.nodeid and "[s3" not in item.nodeid
                and item.get_closest_marker("slow") is None
                and not _SERVICE_FIXTURES & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.fast)
