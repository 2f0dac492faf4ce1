"""Reindex from the store alone, bulk import, and study completion, on real stores."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import text

from anonymize import DeidentificationPolicy, PseudonymKeys
from gateway.importer import run_import
from gateway.sample_study import SampleStudySpec, write_sample_study
from spool import Spool
from storage import (
    FilesystemObjectStore,
    IndexRepository,
    StudyQuery,
    create_index_engine,
    manifest_key,
    migrate,
)
from tests.support.webhook import Received, webhook_receiver
from worker import IngestPipeline, StudyCompletion, Webhook, verify
from worker.events import SIGNATURE_HEADER, deliver
from worker.reindex import reindex

SECRET = b"reindex-test-secret-0123456789abcdef"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.sqlite3'}"
    return str(request.getfixturevalue("create_postgres_database")())


def _pipeline(tmp_path: Path, database_url: str) -> IngestPipeline:
    engine = create_index_engine(database_url)
    migrate(engine)
    return IngestPipeline(
        store=FilesystemObjectStore(tmp_path / "objects"), index=IndexRepository(engine),
        policy=DeidentificationPolicy(PseudonymKeys(SECRET), "site1"),
        spool_root=tmp_path / "spool", quarantine_root=tmp_path / "quarantine")


def _study(tmp_path: Path, ct: int = 4, mr: int = 2, seed: int = 1) -> Path:
    return Path(write_sample_study(tmp_path / f"study-{seed}",
                                   SampleStudySpec(ct_slices=ct, mr_slices=mr, ct_size=64,
                                                   mr_size=32, seed=seed))[0]).parent


def test_reindex_rebuilds_exactly_the_same_index(tmp_path: Path, database_url: str) -> None:
    pipeline = _pipeline(tmp_path, database_url)
    run_import([_study(tmp_path), _study(tmp_path, 3, 1, seed=2)], pipeline,
               Spool(tmp_path / "spool", "site1"))
    before = pipeline.index.dump()
    assert len(before["instances"]) == 10 and len(before["studies"]) == 2
    report = reindex(pipeline.store, pipeline.index)
    assert report.indexed == 10 and report.unreadable == []
    assert pipeline.index.dump() == before


def test_reindex_of_an_unlistable_store_fails_and_keeps_the_index(tmp_path: Path) -> None:
    """A broken link in the store (a disk not mounted): reindex stops before emptying the
    index, instead of rebuilding it without what it could not see."""
    from storage import StorageError

    pipeline = _pipeline(tmp_path, f"sqlite:///{tmp_path / 'index.sqlite3'}")
    run_import([_study(tmp_path, 2, 1)], pipeline, Spool(tmp_path / "spool", "site1"))
    before = pipeline.index.dump()
    assert len(before["instances"]) == 3
    some_series = next((tmp_path / "objects" / "studies").glob("*/series"))
    (some_series / "unmounted").symlink_to(tmp_path / "not-there", target_is_directory=True)
    (some_series / "lost.dcm").symlink_to(tmp_path / "not-there.dcm")
    with pytest.raises(StorageError, match="cannot list"):
        reindex(pipeline.store, pipeline.index)
    assert pipeline.index.dump() == before


def test_import_walks_folders_and_zips_and_reports(tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path, f"sqlite:///{tmp_path / 'index.sqlite3'}")
    folder = _study(tmp_path, ct=3, mr=1)
    archive = tmp_path / "second.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(_study(tmp_path, ct=2, mr=0, seed=3).glob("*.dcm")):
            handle.write(path, f"nested/{path.name}")
        handle.writestr("README.txt", "not an image")
    (folder / "notes.txt").write_text("not DICOM either")
    ultrasound = Path(__import__("deid_data").__file__).parent / "data" / "ultrasounds" / "GREYSCALE_IMAGE.dcm"
    shutil.copy(ultrasound, folder / "us.dcm")
    spool = Spool(tmp_path / "spool", "site1")
    summary = run_import([folder, archive], pipeline, spool)
    assert (summary.stored, summary.not_dicom, summary.duplicates) == (6, 2, 0)
    assert dict(summary.quarantined) == {"BurnedInAnnotationRisk": 1}
    again = run_import([folder, archive], pipeline, spool)
    assert (again.stored, again.duplicates) == (0, 6)
    assert len(pipeline.index.search_studies(StudyQuery())) == 2


def test_import_command_prints_a_summary(tmp_path: Path) -> None:
    folder = _study(tmp_path, ct=2, mr=1)
    env = {"DICOM_GATEWAY_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin",
           "DICOM_GATEWAY_PSEUDONYM_SECRET": SECRET.decode()}
    result = subprocess.run([sys.executable, "-m", "gateway", "import", str(folder)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {"files": 3, "stored": 3, "duplicates": 0, "not_dicom": 0, "too_large": 0,
                       "quarantined": {}}
    assert "3 stored" in result.stderr


@pytest.fixture
def receiver() -> Iterator[Received]:
    with webhook_receiver() as received:
        yield received


def test_completion_writes_metadata_thumbnails_manifest_and_signed_event(
    tmp_path: Path, receiver: Received,
) -> None:
    pipeline = _pipeline(tmp_path, f"sqlite:///{tmp_path / 'index.sqlite3'}")
    run_import([_study(tmp_path, ct=5, mr=3)], pipeline, Spool(tmp_path / "spool", "site1"))
    webhook = Webhook(receiver.url, "hook-secret-0123456789")
    completion = StudyCompletion(pipeline.store, pipeline.index, "site1", webhooks=(webhook,),
                                 deliver=lambda n, t, d, b: deliver(webhook, t, d, b),
                                 retrieve_url_base="https://gateway.example/dicom-web")
    [study_uid] = completion.run(quiet_seconds=0)
    assert completion.run(quiet_seconds=0) == []  # nothing new: not due again
    series = {i.key.split("/")[3] for i in pipeline.store.list(f"studies/{study_uid}/series/")}
    assert len(series) == 2
    for series_uid in series:
        documents = json.loads(pipeline.store.get(f"studies/{study_uid}/series/{series_uid}/metadata.json"))
        assert len(documents) in (5, 3)
        assert all("BulkDataURI" in d["7FE00010"] for d in documents)
        png = pipeline.store.get(f"studies/{study_uid}/series/{series_uid}/thumbnail.png")
        assert png.startswith(b"\x89PNG")
    manifest = pydicom.dcmread(BytesIO(pipeline.store.get(manifest_key(study_uid))))
    assert manifest.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"
    referenced = [i.ReferencedSOPInstanceUID
                  for study in manifest.CurrentRequestedProcedureEvidenceSequence
                  for s in study.ReferencedSeriesSequence for i in s.ReferencedSOPSequence]
    assert len(referenced) == 8
    [(headers, body)] = receiver.events
    assert verify(webhook.secret, body, headers[SIGNATURE_HEADER.lower()])
    assert not verify("another-secret", body, headers[SIGNATURE_HEADER.lower()])
    event = json.loads(body)
    assert event["event"] == "study.stored" and event["number_of_instances"] == 8
    assert event["study_instance_uid"] == study_uid and event["modalities"] == ["CT", "MR"]


def test_completion_covers_the_workers_own_sites_only(tmp_path: Path) -> None:
    """Two sites in one regional index: site2's worker completes (and notifies about)
    site2's study, never site1's, and site1's study stays due for site1's worker."""
    pipeline = _pipeline(tmp_path, f"sqlite:///{tmp_path / 'index.sqlite3'}")
    run_import([_study(tmp_path / "one", ct=1, mr=0)], pipeline, Spool(tmp_path / "spool", "site1"))
    other = dataclasses.replace(pipeline, policy=dataclasses.replace(pipeline.policy, site_id="site2"))
    run_import([_study(tmp_path / "two", ct=1, mr=0, seed=99)], other, Spool(tmp_path / "spool", "site2"))
    with pipeline.index.engine.connect() as connection:
        sites = dict(connection.execute(text("SELECT study_instance_uid, site_id FROM studies")).all())
    assert sorted(sites.values()) == ["site1", "site2"]
    assert StudyCompletion(pipeline.store, pipeline.index, "site2").run(quiet_seconds=0) == [
        uid for uid, site in sites.items() if site == "site2"]
    assert StudyCompletion(pipeline.store, pipeline.index, "site1").run(quiet_seconds=0) == [
        uid for uid, site in sites.items() if site == "site1"]


def test_a_failed_completion_is_recorded_retried_later_and_shown_in_metrics(
        tmp_path: Path) -> None:
    """One study's completion fails (an instance's metadata object is gone): recorded with
    its error type and due again later; the other study is completed; /metrics counts it."""
    from fastapi.testclient import TestClient

    from storage import instance_metadata_key
    from web_viewer_api import ApiConfig, create_app

    pipeline = _pipeline(tmp_path, f"sqlite:///{tmp_path / 'index.sqlite3'}")
    run_import([_study(tmp_path / "one", ct=2, mr=0)], pipeline, Spool(tmp_path / "spool", "site1"))
    run_import([_study(tmp_path / "two", ct=1, mr=0, seed=7)], pipeline,
               Spool(tmp_path / "spool", "site1"))
    due = pipeline.index.studies_due_for_completion(0.0)
    assert len(due) == 2
    broken = due[0].study_instance_uid
    [(series, sop, _cls, _key)] = pipeline.index.study_instances(broken)[:1]
    saved = pipeline.store.get(instance_metadata_key(broken, series, sop))
    pipeline.store.delete(instance_metadata_key(broken, series, sop))
    completion = StudyCompletion(pipeline.store, pipeline.index, "site1")
    assert completion.run(quiet_seconds=0) == [due[1].study_instance_uid]
    assert pipeline.index.completion_counts() == (1, 1)
    assert completion.run(quiet_seconds=0) == []  # not before its retry time
    app = create_app(ApiConfig("metrics-token-0123456789abcdef"), pipeline.index, pipeline.store)
    with TestClient(app) as client:
        metrics = client.get("/metrics").text
    assert 'dicom_gateway_study_completions{state="failed"} 1.0' in metrics
    assert 'dicom_gateway_study_completions{state="pending"} 1.0' in metrics
    pipeline.store.put(instance_metadata_key(broken, series, sop), saved)
    assert completion.run(quiet_seconds=-3600.0) == [broken]  # its retry time come
    assert pipeline.index.completion_counts() == (0, 0)


def test_import_never_inflates_a_zip_member_past_the_limit(tmp_path: Path) -> None:
    """A zip bomb: 64 MiB of zeros deflate to 64 KB. With an 8 MiB limit the member is
    counted too large without being inflated (memory stays far below it); a damaged member
    is not DICOM; the study beside them is imported."""
    import tracemalloc

    pipeline = _pipeline(tmp_path, f"sqlite:///{tmp_path / 'index.sqlite3'}")
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        for path in sorted(_study(tmp_path, ct=2, mr=0, seed=5).glob("*.dcm")):
            handle.write(path, path.name)
        handle.writestr("bomb.dcm", bytes(64 * 1024 * 1024))
        handle.writestr("damaged.dcm", bytes(4096))
    assert archive.stat().st_size < 1024 * 1024
    raw = bytearray(archive.read_bytes())  # damage the last member's data: bad CRC
    local = raw.rfind(b"PK\x03\x04")
    raw[local + 30 + len("damaged.dcm") + 2] ^= 0xFF
    archive.write_bytes(bytes(raw))
    tracemalloc.start()
    try:
        summary = run_import([archive], pipeline, Spool(tmp_path / "spool", "site1"),
                             max_file_bytes=8 * 1024 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (summary.stored, summary.too_large, summary.not_dicom) == (2, 1, 1)
    assert peak < 32 * 1024 * 1024
