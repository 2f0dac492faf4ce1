"""Faults on the production column, every component in its own process (node, worker and
API started from deploy/'s units; Redis broker, PostgreSQL index, SeaweedFS objects):
a crash or an outage delays ingest, clients get clear answers meanwhile, and every instance
acknowledged with Success ends up stored and indexed exactly once.

* SIGKILL of the worker mid-batch, of the node mid-association, of the API mid-STOW-RS;
* SeaweedFS stopped for 30 s during ingest;
* PostgreSQL connection loss (through a proxy we cut) and Redis stopped and restarted.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from gateway.sample_study import SampleStudySpec, write_sample_study
from tests.faults.conftest import PrivateRedis
from tests.support.cluster import DEFAULT_CALLING_AE, Cluster
from tests.support.services import http_json, wait_for
from tests.support.tcp_proxy import TcpProxy

JSON = {"Accept": "application/dicom+json"}
WADO = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}


@pytest.fixture(scope="module")
def column(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("column")
    # A site's API (HTTP__ROLE=site) spools STOW-RS for A beside A's worker. Default
    # settings: recovery rests on facts (claims, records, the broker's identity), not on
    # shortened thresholds.
    with Cluster(root, sites=("A",), apis=1,
                 api_settings={"DATA_DIR": str(root / "site-A"), "SITE_ID": "A",
                               "HTTP__ROLE": "site"}) as cluster:
        yield cluster


def _study(tmp_path: Path, name: str, seed: int, slices: int, size: int = 256) -> tuple[list[Path], str]:
    files = sorted(write_sample_study(tmp_path / name, SampleStudySpec(
        ct_slices=slices, mr_slices=0, ct_size=size, seed=seed, with_ins=False)))
    return files, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _exactly_once(cluster: Cluster, study: str, count: int) -> None:
    """`count` rows for the study, one S3 object per instance, nothing left in the spool."""
    cluster.wait_indexed(count, study=study)
    assert cluster.count_instances(study=study) == count
    assert len([k for k in cluster.s3_keys(f"studies/{study}/")
                if "/instances/" in k and k.endswith(".dcm")]) == count
    assert cluster.sql("SELECT count(DISTINCT sop_instance_uid) FROM instances "
                       "WHERE study_instance_uid = :s", s=study)[0][0] == count


def test_worker_killed_mid_batch(column: Cluster, tmp_path: Path) -> None:
    files, original = _study(tmp_path, "worker-kill", 1101, slices=40, size=512)
    study = column.study_uid(original)
    worker = column.sites["A"].worker
    column.send("A", *files)  # all 40 acknowledged
    wait_for(lambda: len(column.s3_keys(f"studies/{study}/")) >= 3, timeout=120, interval=0.02,
             what="the worker to be storing the batch")
    indexed_at_kill = column.count_instances(study=study)
    column.kill(worker)
    assert indexed_at_kill < 40, "the batch finished before the kill: nothing was tested"
    column.restart(worker)
    _exactly_once(column, study, 40)


def test_node_killed_mid_association(column: Cluster, tmp_path: Path) -> None:
    """storescu is cut off mid-association; what was acknowledged before the kill is on
    disk and gets ingested; the modality's retry of the whole study stores nothing twice."""
    files, original = _study(tmp_path, "node-kill", 1102, slices=40)
    study = column.study_uid(original)
    site = column.sites["A"]
    spooled_before = site.spooled()
    sender = subprocess.Popen(
        ["storescu", "-aet", DEFAULT_CALLING_AE, "-aec", site.ae_title, "127.0.0.1",
         str(site.dicom_port), *map(str, files)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: site.spooled() - spooled_before >= 5 or column.count_instances(study=study) >= 5,
             timeout=60, interval=0.01, what="some instances acknowledged")
    column.kill(site.node)
    assert sender.wait(timeout=60) != 0  # the modality sees the association fail
    column.restart(site.node)
    column.send("A", *files)  # its retry
    _exactly_once(column, study, 40)


def test_api_killed_mid_stow(column: Cluster, tmp_path: Path) -> None:
    files, original = _study(tmp_path, "stow-kill", 1103, slices=3)
    study = column.study_uid(original)
    api = column.apis[0]
    boundary = "killed-upload"
    parts = [(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), p.read_bytes())
             for p in files]
    headers = {"Authorization": f"Bearer {column.admin_token}", **JSON,
               "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    killed = threading.Event()
    outcome: dict[str, object] = {}

    def body() -> Iterator[bytes]:
        head, first = parts[0]
        yield head + first[: len(first) // 2]
        killed.wait(timeout=60)  # the rest would come after the crash
        yield first[len(first) // 2:]

    def upload() -> None:
        try:
            outcome["response"] = httpx.post(f"{api.url}/dicom-web/studies", content=body(),
                                             headers=headers, timeout=60)
        except httpx.TransportError as exc:
            outcome["error"] = exc

    sender = threading.Thread(target=upload)
    sender.start()
    incoming = column.sites["A"].data_dir / "spool" / ".incoming"
    wait_for(lambda: any(incoming.glob(".stow-*.part")), timeout=30, what="the upload to reach the API")
    column.kill(api.process)
    killed.set()
    sender.join(timeout=60)
    assert "error" in outcome, outcome  # a clear transport error, not a fake success
    column.restart(api.process)
    whole = b"".join(head + data + b"\r\n" for head, data in parts) + f"--{boundary}--\r\n".encode()
    retry = httpx.post(f"{api.url}/dicom-web/studies", content=whole, headers=headers, timeout=60)
    assert retry.status_code == 202, retry.text
    _exactly_once(column, study, 3)


def test_seaweedfs_down_for_30_seconds(column: Cluster, tmp_path: Path) -> None:
    """Objects unreachable: the node still acknowledges (the spool is durable), the API
    says so (readiness 503, retrieval 503 with a JSON error, search still answers), and
    everything lands once S3 is back."""
    earlier = column.sql("SELECT study_instance_uid FROM studies LIMIT 1")[0][0]
    files, original = _study(tmp_path, "s3-outage", 1104, slices=8)
    study = column.study_uid(original)
    api = column.apis[0]
    assert column.seaweedfs is not None
    column.seaweedfs.stop()
    stopped = time.monotonic()
    try:
        column.send("A", *files)  # acknowledged while S3 is down
        status, body, _ = http_json(f"{api.url}/readyz")
        assert status == 503 and "object_store" in str(body)
        retrieve = httpx.get(f"{api.url}/dicom-web/studies/{earlier}", timeout=60,
                             headers={"Authorization": f"Bearer {column.admin_token}", **WADO})
        assert retrieve.status_code == 503 and retrieve.json()["error"], retrieve.text
        status, found, _ = http_json(f"{api.url}/dicom-web/studies", token=column.admin_token)
        assert status == 200 and found
        assert column.count_instances(study=study) == 0
        wait_for(lambda: time.monotonic() - stopped >= 30, timeout=60, interval=0.5,
                 what="a 30-second outage")
    finally:
        column.seaweedfs.restart()
    _exactly_once(column, study, 8)
    assert http_json(f"{api.url}/readyz")[0] == 200


def test_postgresql_connection_loss_and_redis_restart(tmp_path: Path, private_redis: PrivateRedis) -> None:
    """Every process reaches PostgreSQL through a proxy we cut, and the broker is a Redis
    of this test's own that we stop and start again (empty: a restart without persistence)."""
    with TcpProxy("127.0.0.1", 5432) as proxy, Cluster(
            tmp_path / "column", sites=("A",), apis=1, redis_url=private_redis.url,
            postgres_admin_url=f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres") as column:
        api = column.apis[0]
        first, first_original = _study(tmp_path, "db-outage", 1105, slices=6)
        proxy.cut()
        try:
            column.send("A", *first)  # the node needs no database to acknowledge
            status, body, _ = http_json(f"{api.url}/dicom-web/studies", token=column.admin_token)
            assert status == 503 and body and body["error"], body  # a clear error, not a 500
            assert http_json(f"{api.url}/readyz")[0] == 503
            wait_for(lambda: "waits for a retry"
                     in column.sites["A"].worker.log_text(), timeout=90,
                     what="the worker to record the batch for a retry")
        finally:
            proxy.restore()
        _exactly_once(column, column.study_uid(first_original), 6)

        second, second_original = _study(tmp_path, "broker-outage", 1106, slices=6)
        private_redis.stop()
        column.send("A", *second)  # acknowledged: on disk; the enqueue fails and is retried
        assert column.count_instances(study=column.study_uid(second_original)) == 0
        private_redis.start()  # empty: the workers' recovery loop sends the stranded batch
        _exactly_once(column, column.study_uid(second_original), 6)
        assert column.sites["A"].spooled() == 0
