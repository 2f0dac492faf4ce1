"""The ingest pipeline on real stores: spool batch -> objects + index, spool deleted last."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pydicom
import pytest

from anonymize import (
    DEFAULT_OPTIONS,
    DeidentificationPolicy,
    PixelMask,
    PixelPolicy,
    ProfileOption,
    PseudonymKeys,
)
from gateway.sample_study import SampleStudySpec, write_sample_study
from spool import BatchClaim, read_pending
from storage import (
    FilesystemObjectStore,
    IndexRepository,
    S3ObjectStore,
    StorageError,
    StudyQuery,
    create_index_engine,
    migrate,
)
from tests.support.services import free_port
from worker import IngestPipeline, TransientPipelineError, read_provenance

SECRET = b"pipeline-test-secret-0123456789abcdef"
US_WITH_TEXT = Path(__import__("deid_data").__file__).parent / "data" / "ultrasounds" / "GREYSCALE_IMAGE.dcm"


def _pipeline(tmp_path: Path, store: object | None = None,
              policy: DeidentificationPolicy | None = None) -> IngestPipeline:
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    migrate(engine)
    return IngestPipeline(
        store=store or FilesystemObjectStore(tmp_path / "objects"),  # type: ignore[arg-type]
        index=IndexRepository(engine),
        policy=policy or DeidentificationPolicy(PseudonymKeys(SECRET), "site1"),
        spool_root=tmp_path / "spool",
        quarantine_root=tmp_path / "quarantine",
    )


def _instance_keys(pipeline: IngestPipeline) -> list[str]:
    return [i.key for i in pipeline.store.list("studies/") if i.key.endswith(".dcm")]


def _spool_batch(tmp_path: Path, batch: str = "b1", ct: int = 3, mr: int = 2) -> Path:
    directory = tmp_path / "spool" / "site1" / batch
    written = write_sample_study(tmp_path / "src", SampleStudySpec(ct_slices=ct, mr_slices=mr,
                                                                   ct_size=64, mr_size=32))
    directory.mkdir(parents=True)
    for path in written:
        shutil.copy(path, directory / f"{pydicom.dcmread(path).SOPInstanceUID}.dcm")
    return directory


def test_batch_is_stored_indexed_and_removed_from_the_spool(tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path)
    batch = _spool_batch(tmp_path)
    report = pipeline.ingest_batch("site1", "b1")
    assert (report.stored, report.quarantined) == (5, 0)
    assert not batch.exists()
    keys = _instance_keys(pipeline)
    assert len(keys) == 5
    assert len([i for i in pipeline.store.list("studies/") if "/instances/" in i.key
                and i.key.endswith(".json")]) == 5
    [study] = pipeline.index.search_studies(StudyQuery())
    assert study.number_of_instances == 5 and study.modalities_in_study == ("CT", "MR")
    stored = pydicom.dcmread(tmp_path / "objects" / keys[0])
    assert stored.PatientIdentityRemoved == "YES"
    assert str(stored.StudyInstanceUID) == study.study_instance_uid
    assert stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.201"  # HTJ2K lossless
    # The site is not named in objects (only with Retain Institution Identity).
    assert read_provenance(stored) == ("", "1.2.840.10008.1.2.1", "htj2k")
    assert stored.pixel_array.shape in ((64, 64), (32, 32))


def test_running_a_batch_twice_does_not_duplicate(tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path)
    _spool_batch(tmp_path, "b1")
    pipeline.ingest_batch("site1", "b1")
    _spool_batch(tmp_path / "again", "b1")  # same study re-sent: deterministic UIDs
    shutil.copytree(tmp_path / "again" / "spool" / "site1" / "b1", tmp_path / "spool" / "site1" / "b1")
    pipeline.ingest_batch("site1", "b1")
    assert len(_instance_keys(pipeline)) == 5
    assert pipeline.index.search_studies(StudyQuery())[0].number_of_instances == 5
    assert pipeline.ingest_batch("site1", "b1").missing  # a redelivered task is a no-op


def test_unparseable_instance_is_quarantined_with_a_reason(tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path)
    batch = _spool_batch(tmp_path, ct=2, mr=0)
    (batch / "1.2.3.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 64)
    report = pipeline.ingest_batch("site1", "b1")
    assert (report.stored, report.quarantined) == (2, 1)
    quarantined = tmp_path / "quarantine" / "site1" / "b1"
    assert (quarantined / "1.2.3.dcm").exists()
    reason = json.loads((quarantined / "1.2.3.dcm.reason.json").read_text())
    assert reason["reason"] and reason["batch_id"] == "b1"
    assert not batch.exists()


def test_bad_inputs_are_quarantined_and_nothing_partial_is_stored(tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path)
    batch = _spool_batch(tmp_path, ct=1, mr=0)
    good = next(batch.glob("*.dcm"))
    no_uids = pydicom.dcmread(good)
    del no_uids.SeriesInstanceUID
    no_uids.SOPInstanceUID = "1.2.3.1"
    no_uids.save_as(batch / "1.2.3.1.dcm", enforce_file_format=True)
    (batch / "1.2.3.2.dcm").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (batch / "1.2.3.3.dcm").write_bytes(b"%PDF-1.4 not a DICOM file at all")
    ultrasound = pydicom.dcmread(US_WITH_TEXT)
    ultrasound.save_as(batch / "1.2.3.4.dcm", enforce_file_format=True)
    report = pipeline.ingest_batch("site1", "b1")
    assert (report.stored, report.quarantined) == (1, 4)
    reasons = {p.name.split(".reason")[0]: json.loads(p.read_text())["reason"]
               for p in (tmp_path / "quarantine" / "site1" / "b1").glob("*.reason.json")}
    assert reasons["1.2.3.1.dcm"] == "DeidentificationError"
    assert reasons["1.2.3.4.dcm"] == "BurnedInAnnotationRisk"
    assert set(reasons) == {"1.2.3.1.dcm", "1.2.3.2.dcm", "1.2.3.3.dcm", "1.2.3.4.dcm"}
    assert len(_instance_keys(pipeline)) == 1  # only the good instance


def test_store_outage_keeps_the_spool_and_asks_for_a_retry(tmp_path: Path) -> None:
    unreachable = S3ObjectStore("bucket", endpoint_url=f"http://127.0.0.1:{free_port()}",
                                region="us-east-1", access_key="a", secret_key="b")
    pipeline = _pipeline(tmp_path, unreachable)
    batch = _spool_batch(tmp_path, ct=2, mr=0)
    with pytest.raises(TransientPipelineError):
        pipeline.ingest_batch("site1", "b1")
    assert len(list(batch.glob("*.dcm"))) == 2
    assert pipeline.index.search_studies(StudyQuery()) == []
    # Recorded for the recovery loop: when, how often, what failed (a type, no value).
    record = read_pending(batch)
    assert record is not None and record.state == "retry" and record.attempts == 1
    assert record.reason == "TransientStorageError" and record.retry_at > record.at
    with pytest.raises(TransientPipelineError):
        pipeline.ingest_batch("site1", "b1")
    assert read_pending(batch).attempts == 2  # type: ignore[union-attr]


def test_a_worker_waits_for_the_writer_of_a_batch_then_processes_it(tmp_path: Path) -> None:
    """A task that arrives while the batch is still claimed (its writer handing it over)
    waits for the claim; a later copy of the task finds the batch processed."""
    pipeline = _pipeline(tmp_path)
    batch = _spool_batch(tmp_path, ct=2, mr=0)
    writer = BatchClaim.acquire(batch, wait=False)
    assert writer is not None
    done: list[int] = []
    worker = threading.Thread(target=lambda: done.append(pipeline.ingest_batch("site1", "b1").stored))
    worker.start()
    worker.join(timeout=1.0)
    assert worker.is_alive() and done == [] and len(list(batch.glob("*.dcm"))) == 2
    writer.release()
    worker.join(timeout=60)
    assert done == [2] and not batch.exists()
    assert pipeline.ingest_batch("site1", "b1").missing


def test_batch_names_cannot_escape_the_spool(tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path)
    with pytest.raises(ValueError):
        pipeline.ingest_batch("site1", "../../etc")


def test_a_masked_ultrasound_sent_twice_is_one_stored_instance(tmp_path: Path) -> None:
    ultrasound = pydicom.dcmread(US_WITH_TEXT)
    mask = PixelMask("US", int(ultrasound.Rows), int(ultrasound.Columns), ((0, 0, 1024, 60),))
    pipeline = _pipeline(tmp_path, policy=DeidentificationPolicy(
        PseudonymKeys(SECRET), "site1", pixel_policy=PixelPolicy(masks=(mask,))))
    reports = []
    for batch in ("first", "again"):
        directory = tmp_path / "spool" / "site1" / batch
        directory.mkdir(parents=True)
        ultrasound.save_as(directory / f"{ultrasound.SOPInstanceUID}.dcm", enforce_file_format=True)
        reports.append(pipeline.ingest_batch("site1", batch))
    # The second is an idempotent success: stored again as the same object, nothing added.
    assert [(r.stored, r.quarantined) for r in reports] == [(1, 0), (1, 0)]
    assert not (tmp_path / "quarantine").exists()
    [key] = _instance_keys(pipeline)
    stored = pydicom.dcmread(tmp_path / "objects" / key)
    assert stored.SOPInstanceUID == PseudonymKeys(SECRET).uid(str(ultrasound.SOPInstanceUID))
    assert stored.BurnedInAnnotation == "NO"
    [study] = pipeline.index.search_studies(StudyQuery())
    assert study.number_of_instances == 1


@pytest.mark.parametrize("bad_uid", ["1.2.03.4", "1.2.840.ABC.1", "1.2.3 4", "1." + "2" * 70],
                         ids=["leading-zero", "letters", "space", "too-long"])
def test_an_invalid_uid_under_retain_uids_is_quarantined_once_with_its_reason(
        tmp_path: Path, bad_uid: str) -> None:
    policy = DeidentificationPolicy(PseudonymKeys(SECRET), "site1",
                                    options=DEFAULT_OPTIONS | {ProfileOption.RETAIN_UIDS})
    pipeline = _pipeline(tmp_path, policy=policy)
    batch = _spool_batch(tmp_path, ct=3, mr=0)
    bad_path = sorted(batch.glob("*.dcm"))[1]
    bad = pydicom.dcmread(bad_path)
    bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = bad_uid
    bad.save_as(bad_path, enforce_file_format=True)
    report = pipeline.ingest_batch("site1", "b1")  # finishes: no TransientPipelineError
    assert (report.stored, report.quarantined) == (2, 1)
    assert not batch.exists()
    quarantined = tmp_path / "quarantine" / "site1" / "b1"
    assert (quarantined / bad_path.name).exists()
    reason_text = (quarantined / f"{bad_path.name}.reason.json").read_text()
    reason = json.loads(reason_text)
    assert reason["reason"] == "InvalidUIDError"
    assert "SOPInstanceUID" in reason["detail"] and "Retain UIDs" in reason["detail"]
    assert bad_uid not in reason_text  # an original identifier: never quoted
    # The other instances are stored under their own (retained) UIDs.
    stored = {pydicom.dcmread(tmp_path / "objects" / k).SOPInstanceUID for k in _instance_keys(pipeline)}
    assert len(stored) == 2 and bad_uid not in stored
    assert pipeline.ingest_batch("site1", "b1").missing  # done: nothing left to retry


class _FailingWrites(FilesystemObjectStore):
    """A real filesystem store whose object writes fail from the `fail_from`-th instance
    object on (an outage in the middle of a batch, while the next instance is prepared)."""

    def __init__(self, root: Path, fail_from: int) -> None:
        super().__init__(root)
        self.fail_from, self.instance_writes = fail_from, 0

    def create(self, key: str, body: bytes, **kwargs: object) -> None:  # type: ignore[override]
        if key.endswith(".dcm") and "/instances/" in key:
            self.instance_writes += 1
            if self.instance_writes >= self.fail_from:
                raise StorageError("object store unavailable")
        super().create(key, body, **kwargs)  # type: ignore[arg-type]


def test_a_write_failing_mid_batch_keeps_the_spool_and_a_retry_stores_each_once(
        tmp_path: Path) -> None:
    """Objects are written while the next instance is prepared: an outage at the third
    write still fails the whole batch (retried), leaves every spool file, indexes nothing;
    the retry stores each instance once (the objects written before are found, not
    duplicated)."""
    failing = _FailingWrites(tmp_path / "objects", fail_from=3)
    batch = _spool_batch(tmp_path, ct=4, mr=1)
    with pytest.raises(TransientPipelineError):
        _pipeline(tmp_path, failing).ingest_batch("site1", "b1")
    assert len(list(batch.glob("*.dcm"))) == 5
    assert failing.instance_writes == 3  # the batch stopped at the failure
    healthy = _pipeline(tmp_path, FilesystemObjectStore(tmp_path / "objects"))
    report = healthy.ingest_batch("site1", "b1")
    assert (report.stored, report.quarantined) == (5, 0)
    assert len(_instance_keys(healthy)) == 5
    assert healthy.index.search_studies(StudyQuery())[0].number_of_instances == 5
    assert not batch.exists()


def test_patient_pseudonyms_have_the_shape_the_domain_check_looks_for() -> None:
    keys = PseudonymKeys(SECRET)
    pseudonyms = [keys.patient_id(f"site1|{n}") for n in range(500)]
    assert all(PseudonymKeys.is_patient_pseudonym(p) for p in pseudonyms)
    for original in ("12345", "1871234567890", "P123", "p" + pseudonyms[0][1:],
                     pseudonyms[0] + "X", "ANONYMOUS^" + pseudonyms[0], ""):
        assert not PseudonymKeys.is_patient_pseudonym(original)
