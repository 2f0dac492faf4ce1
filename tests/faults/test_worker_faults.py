"""Real Celery workers under faults: SIGKILL mid-batch (Redis and RabbitMQ), S3 outage,
database outage, broker restart. Nothing acknowledged is lost; effects are exactly once."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from kombu import Connection

from anonymize import DeidentificationPolicy, PseudonymKeys
from gateway.sample_study import SampleStudySpec, write_sample_study
from storage import FilesystemObjectStore, IndexRepository, create_index_engine, migrate
from tests.faults.conftest import PrivateRedis
from tests.support.seaweedfs import SeaweedFS
from tests.support.services import GatewayProcess, gateway_command, gateway_env, wait_for
from tests.support.tcp_proxy import TcpProxy
from worker import IngestPipeline, create_celery_app, enqueue_ingest

SECRET = "faults-pseudonym-secret-0123456789abcdef"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


def _spool(data_dir: Path, site: str, batch: str, source: Path) -> Path:
    directory = data_dir / "spool" / site / batch
    directory.mkdir(parents=True)
    for path in sorted(source.glob("*.dcm")):
        shutil.copy(path, directory / f"{pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID}.dcm")
    return directory


def _objects(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*.dcm")}


def _index(url: str) -> IndexRepository:
    engine = create_index_engine(url)
    migrate(engine)
    return IndexRepository(engine)


def _count(url: str) -> int:
    return len(_index(url).dump()["instances"])


def _reference(tmp_path: Path, site: str, source: Path) -> tuple[dict[str, str], dict[str, list[dict[str, object]]]]:
    """What a clean, uninterrupted run of the same batch stores."""
    root = tmp_path / "reference"
    root.mkdir()
    index = _index(f"sqlite:///{root / 'index.sqlite3'}")
    pipeline = IngestPipeline(FilesystemObjectStore(root / "objects"), index,
                              DeidentificationPolicy(PseudonymKeys(SECRET.encode()), site),
                              root / "spool", root / "quarantine")
    _spool(root, site, "batch", source)
    assert pipeline.ingest_batch(site, "batch").stored == len(list(source.glob("*.dcm")))
    return _objects(root / "objects"), index.dump()


def _ingest_retried(worker: GatewayProcess) -> bool:
    """The worker recorded the batch for a retry (the recovery loop sends it again)."""
    return "waits for a retry" in worker.log_text()


def _outage_then_recovery(tmp_path: Path, env: dict[str, str], data_dir: Path, site: str,
                          source: Path, broker_url: str, options: dict[str, object],
                          break_it: Callable[[], object], restore: Callable[[], object],
                          index_url: str) -> None:
    """A worker runs, a dependency breaks, a batch arrives and is retried, the dependency
    comes back: every instance of the batch ends up indexed."""
    _spool(data_dir, site, "batch", source)
    expected = len(list(source.glob("*.dcm")))
    with _worker(tmp_path, env, "worker") as worker:
        _wait_ready(data_dir, worker)
        break_it()
        _sender(broker_url, site, options)("batch")
        wait_for(lambda: _ingest_retried(worker), timeout=60, what="the ingest task to be retried")
        restore()
        wait_for(lambda: _count(index_url) == expected, timeout=120,
                 what="every instance to be indexed after the outage")


def _sender(broker_url: str, site: str, options: dict[str, object]) -> Callable[[str], None]:
    app = create_celery_app(broker_url, site_id=site, transport_options=options)
    return lambda batch: enqueue_ingest(app, site, batch)


def _worker(tmp_path: Path, env: dict[str, str], name: str) -> GatewayProcess:
    return GatewayProcess(gateway_command("worker", "--concurrency", "1"), env, tmp_path / f"{name}.log")


def _wait_ready(data_dir: Path, worker: GatewayProcess) -> None:
    wait_for(lambda: (data_dir / "run" / "worker.ready").exists() or not worker.alive(),
             timeout=90, what="the worker to be ready")
    assert worker.alive(), worker.log_text()


@contextlib.contextmanager
def _worker_mid_batch(tmp_path: Path, env: dict[str, str], data_dir: Path, site: str, source: Path,
                      broker_url: str, options: dict[str, object],
                      name: str) -> Iterator[tuple[GatewayProcess, Path]]:
    """A worker that has stored part of a spooled 30-instance batch and not the rest: the
    moment to interrupt it. Yields the worker and the batch's spool folder."""
    batch_dir = _spool(data_dir, site, "batch", source)
    objects_dir = data_dir / "objects"
    with _worker(tmp_path, env, name) as worker:
        _wait_ready(data_dir, worker)
        _sender(broker_url, site, options)("batch")
        wait_for(lambda: 3 <= len(_objects(objects_dir)) < 30 if objects_dir.exists() else False,
                 timeout=120, interval=0.02, what="the batch to be under way")
        yield worker, batch_dir


@pytest.fixture(scope="module")
def big_batch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("big-batch")
    write_sample_study(folder, SampleStudySpec(ct_slices=30, mr_slices=0, seed=7))
    return folder


@pytest.fixture(scope="module")
def small_batch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("small-batch")
    write_sample_study(folder, SampleStudySpec(ct_slices=6, mr_slices=2, ct_size=128, mr_size=64, seed=8))
    return folder


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_worker_killed_mid_batch_yields_exactly_the_same_objects_and_rows(
    broker: str, tmp_path: Path, big_batch: Path, redis_url: str,
) -> None:
    site = f"kill-{broker}-{uuid.uuid4().hex[:6]}"
    data_dir = tmp_path / "data"
    visibility = 3
    options: dict[str, object] = (
        {"global_keyprefix": f"dgw-{uuid.uuid4().hex}:", "visibility_timeout": visibility}
        if broker == "redis" else {})
    url = redis_url if broker == "redis" else RABBITMQ_URL
    if broker == "rabbitmq":
        with Connection(url, connect_timeout=5) as connection:
            connection.ensure_connection(max_retries=1)
    env = gateway_env(data_dir, site_id=site, pseudonym_secret=SECRET, broker_url=url,
                      broker_transport_options=json.dumps(options))
    index_url = f"sqlite:///{data_dir / 'index.sqlite3'}"
    objects_dir = data_dir / "objects"
    with _worker_mid_batch(tmp_path, env, data_dir, site, big_batch, url, options,
                           "first") as (first, batch_dir):
        first.stop(signal.SIGKILL)
        killed_at = time.monotonic()
    assert _count(index_url) == 0  # the index is written once per batch, after the objects
    assert batch_dir.exists()  # and the spool deleted last
    (data_dir / "run" / "worker.ready").unlink(missing_ok=True)
    if broker == "redis":  # the broker redelivers an unacknowledged task after its visibility timeout
        wait_for(lambda: time.monotonic() > killed_at + visibility + 0.5, timeout=10,
                 what="the visibility timeout to pass")
    with _worker(tmp_path, env, "second") as second:
        _wait_ready(data_dir, second)
        wait_for(lambda: not batch_dir.exists(), timeout=180, what="the batch to be redelivered")
    expected_objects, expected_rows = _reference(tmp_path, site, big_batch)
    assert _objects(objects_dir) == expected_objects
    assert _index(index_url).dump() == expected_rows


def test_worker_sigterm_finishes_the_batch_in_hand_then_exits(tmp_path: Path, big_batch: Path,
                                                              redis_url: str) -> None:
    """Warm shutdown (what systemd's stop and `serve`'s Ctrl-C send): SIGTERM mid-batch,
    the worker completes that batch — objects, index rows, spool removed — then exits 0,
    with no other worker to pick anything up afterwards."""
    site = f"term-{uuid.uuid4().hex[:6]}"
    data_dir = tmp_path / "data"
    options: dict[str, object] = {"global_keyprefix": f"dgw-{uuid.uuid4().hex}:"}
    env = gateway_env(data_dir, site_id=site, pseudonym_secret=SECRET, broker_url=redis_url,
                      broker_transport_options=json.dumps(options))
    with _worker_mid_batch(tmp_path, env, data_dir, site, big_batch, redis_url, options,
                           "terminated") as (worker, batch_dir):
        assert worker.stop(signal.SIGTERM, timeout=120) == 0, worker.log_text()
    assert not batch_dir.exists(), "the worker left its batch unfinished"
    assert _count(f"sqlite:///{data_dir / 'index.sqlite3'}") == 30
    assert len(_objects(data_dir / "objects")) == 30


def test_s3_outage_delays_but_loses_nothing(tmp_path: Path, small_batch: Path, redis_url: str) -> None:
    site = f"s3-{uuid.uuid4().hex[:6]}"
    data_dir = tmp_path / "data"
    options = {"global_keyprefix": f"dgw-{uuid.uuid4().hex}:"}
    with SeaweedFS(tmp_path / "seaweed") as s3:
        s3.create_bucket("outage")
        env = gateway_env(
            data_dir, site_id=site, pseudonym_secret=SECRET, broker_url=redis_url,
            broker_transport_options=json.dumps(options), object_store__backend="s3",
            object_store__s3__endpoint_url=s3.endpoint_url, object_store__s3__bucket="outage",
            object_store__s3__region=s3.region, object_store__s3__access_key_id=s3.access_key,
            object_store__s3__secret_access_key=s3.secret_key)
        _outage_then_recovery(tmp_path, env, data_dir, site, small_batch, redis_url, options,
                              s3.stop, s3.restart, f"sqlite:///{data_dir / 'index.sqlite3'}")
        keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="outage")["Contents"]]
        assert len([k for k in keys if k.endswith(".dcm")]) == 8


def test_database_outage_delays_but_loses_nothing(
    tmp_path: Path, small_batch: Path, redis_url: str, create_postgres_database: Callable[[], str],
) -> None:
    site = f"db-{uuid.uuid4().hex[:6]}"
    data_dir = tmp_path / "data"
    options = {"global_keyprefix": f"dgw-{uuid.uuid4().hex}:"}
    direct_url = create_postgres_database()
    database = direct_url.rsplit("/", 1)[1]
    with TcpProxy("127.0.0.1", 5432) as proxy:
        proxied = f"postgresql+psycopg2://postgres@127.0.0.1:{proxy.port}/{database}"
        env = gateway_env(data_dir, site_id=site, pseudonym_secret=SECRET, broker_url=redis_url,
                          broker_transport_options=json.dumps(options), database_url=proxied)
        _outage_then_recovery(tmp_path, env, data_dir, site, small_batch, redis_url, options,
                              proxy.cut, proxy.restore, direct_url)


def test_worker_survives_a_broker_restart(tmp_path: Path, small_batch: Path,
                                          private_redis: PrivateRedis) -> None:
    site = f"broker-{uuid.uuid4().hex[:6]}"
    data_dir = tmp_path / "data"
    url = private_redis.url
    env = gateway_env(data_dir, site_id=site, pseudonym_secret=SECRET, broker_url=url)
    _spool(data_dir, site, "first", small_batch)
    with _worker(tmp_path, env, "worker") as worker:
        _wait_ready(data_dir, worker)
        _sender(url, site, {})("first")
        index_url = f"sqlite:///{data_dir / 'index.sqlite3'}"
        wait_for(lambda: _count(index_url) == 8, timeout=120, what="the first batch")
        private_redis.stop()
        private_redis.start()
        second = tmp_path / "second-source"
        write_sample_study(second, SampleStudySpec(ct_slices=2, mr_slices=0, ct_size=64, seed=9))
        _spool(data_dir, site, "second", second)
        _sender(url, site, {})("second")
        wait_for(lambda: _count(index_url) == 10, timeout=120,
                 what="the worker to reconnect and process the next batch")
        assert worker.alive()
