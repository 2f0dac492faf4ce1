"""The trust model on the ingest path, on both columns (SQLite + filesystem objects, and
PostgreSQL + real S3): a stored instance is never replaced, a study's owner and patient
never change because of a later writer, conflicts are quarantined and audited."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian
from sqlalchemy import text

from anonymize import DeidentificationPolicy, ProfileOption, PseudonymKeys
from gateway.sample_study import SampleStudySpec, write_sample_study
from storage import (
    AccessRepository,
    AccessScope,
    AuditQuery,
    IndexRepository,
    InstanceQuery,
    StudyQuery,
    WithheldSummary,
)
from tests.support.columns import COLUMNS, index_engine_and_store
from worker import IngestPipeline, TransientPipelineError, read_provenance
from worker.pipeline import read_study_owner
from worker.reindex import reindex

SECRET = b"ownership-test-secret-0123456789abcdef"
Pipelines = Callable[[str], IngestPipeline]


@pytest.fixture(params=COLUMNS)
def pipelines(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pipelines]:
    """Pipelines of several sites of one domain over one shared store and index."""
    engine, store = index_engine_and_store(request, tmp_path)
    index, access = IndexRepository(engine), AccessRepository(engine)

    def pipeline(site_id: str, *options: ProfileOption) -> IngestPipeline:
        policy = DeidentificationPolicy(PseudonymKeys(SECRET), site_id,
                                        options=frozenset({ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES,
                                                           *options}))
        return IngestPipeline(store=store, index=index, policy=policy,
                              spool_root=tmp_path / "spool", quarantine_root=tmp_path / "quarantine",
                              audit=access.append_audit)

    yield pipeline
    engine.dispose()


def _spool(tmp_path: Path, site_id: str, batch: str, spec: SampleStudySpec,
           change: Callable[[pydicom.Dataset], None] | None = None) -> list[str]:
    """Spool a generated study for `site_id`; `change` alters each dataset first."""
    directory = tmp_path / "spool" / site_id / batch
    directory.mkdir(parents=True)
    names = []
    for path in write_sample_study(tmp_path / "src" / site_id / batch, spec):
        dataset = pydicom.dcmread(path)
        if change is not None:
            change(dataset)
        name = f"{dataset.SOPInstanceUID}.dcm"
        dataset.save_as(directory / name, enforce_file_format=True)
        names.append(name)
    return names


def _objects(pipeline: IngestPipeline) -> dict[str, str]:
    """SHA-256 of every stored instance object, by key."""
    return {info.key: hashlib.sha256(pipeline.store.get(info.key)).hexdigest()
            for info in pipeline.store.list("studies/") if info.key.endswith(".dcm")}


def _alerts(pipeline: IngestPipeline) -> list[dict[str, object]]:
    assert pipeline.audit is not None
    engine = pipeline.index.engine
    return [{"actor": e.actor, "code": e.event_code, "outcome": e.outcome, "study": e.study_instance_uid,
             "detail": json.loads(e.detail)}
            for e in AccessRepository(engine).search_audit(AuditQuery(actions=("instance.conflict",)))]


SMALL = SampleStudySpec(ct_slices=2, mr_slices=1, ct_size=32, mr_size=32)


def test_a_study_re_sent_by_another_site_stays_byte_identical_and_owned_by_the_first(
        pipelines: Pipelines, tmp_path: Path) -> None:
    site_a, site_b = pipelines("siteA"), pipelines("siteB")
    _spool(tmp_path, "siteA", "a1", SMALL)
    assert site_a.ingest_batch("siteA", "a1").stored == 3
    before = _objects(site_a)
    [study] = site_a.index.search_studies(StudyQuery())
    # The "outside study imported at B" workflow: the same files, sent to site B's node.
    _spool(tmp_path, "siteB", "b1", SMALL)
    report = site_b.ingest_batch("siteB", "b1")
    assert (report.stored, report.quarantined) == (3, 0)  # an idempotent success
    assert _objects(site_a) == before
    assert site_a.index.search_studies(StudyQuery()) == [study]
    owner = read_study_owner(site_a.store, study.study_instance_uid)
    assert owner is not None and owner.site_id == "siteA"
    assert site_a.index.dump()["studies"][0]["site_id"] == "siteA"
    assert {row["site_id"] for row in site_a.index.dump()["instances"]} == {"siteA"}
    assert _alerts(site_a) == []


def test_an_altered_copy_under_stored_uids_is_quarantined_audited_and_the_original_stays(
        pipelines: Pipelines, tmp_path: Path) -> None:
    site_a, site_b = pipelines("siteA"), pipelines("siteB")
    _spool(tmp_path, "siteA", "a1", SMALL)
    site_a.ingest_batch("siteA", "a1")
    before = _objects(site_a)

    def white_square(dataset: pydicom.Dataset) -> None:
        pixels = dataset.pixel_array.copy()
        pixels[:8, :8] = pixels.max()
        dataset.PixelData = pixels.tobytes()

    _spool(tmp_path, "siteB", "b1", SMALL, white_square)
    report = site_b.ingest_batch("siteB", "b1")
    assert (report.stored, report.quarantined) == (0, 3)
    assert _objects(site_a) == before
    reasons = [json.loads(p.read_text()) for p in (tmp_path / "quarantine" / "siteB" / "b1").glob("*.reason.json")]
    assert {r["reason"] for r in reasons} == {"InstanceConflict"}
    alerts = _alerts(site_a)
    assert len(alerts) == 3
    [study] = site_a.index.search_studies(StudyQuery())
    for alert in alerts:
        assert (alert["actor"], alert["code"], alert["outcome"], alert["study"]) == \
            ("site:siteB", "110113", 4, study.study_instance_uid)
        detail = alert["detail"]
        assert isinstance(detail, dict)
        assert detail["stored_sha256"] in before.values()
        assert detail["received_sha256"] not in before.values()


def test_without_issuer_another_site_cannot_move_the_study_to_another_patient(
        pipelines: Pipelines, tmp_path: Path) -> None:
    """Without an issuer or INS, the patient pseudonym (and date shift) is qualified by the
    site: B's copy names another patient. The same instances re-sent by B change nothing
    and are no conflict; a new instance B adds to the study under its own pseudonym is."""
    spec = SampleStudySpec(ct_slices=2, mr_slices=0, ct_size=32, with_ins=False)

    def no_issuer(dataset: pydicom.Dataset) -> None:
        del dataset.IssuerOfPatientID

    site_a, site_b = pipelines("siteA"), pipelines("siteB")
    _spool(tmp_path, "siteA", "a1", spec, no_issuer)
    site_a.ingest_batch("siteA", "a1")
    [study] = site_a.index.search_studies(StudyQuery())
    before = _objects(site_a)
    _spool(tmp_path, "siteB", "b1", spec, no_issuer)
    assert site_b.ingest_batch("siteB", "b1").stored == 2
    assert site_a.index.search_studies(StudyQuery()) == [study]
    assert _objects(site_a) == before and _alerts(site_a) == []

    def added(dataset: pydicom.Dataset) -> None:
        no_issuer(dataset)
        dataset.SOPInstanceUID = dataset.SOPInstanceUID[:-3] + "555"

    _spool(tmp_path, "siteB", "b2", spec, added)
    assert site_b.ingest_batch("siteB", "b2").quarantined == 2
    assert site_a.index.search_studies(StudyQuery()) == [study]
    assert _objects(site_a) == before
    assert {a["detail"]["reason"] for a in _alerts(site_a)} == {  # type: ignore[index]
        "the study is stored under another patient pseudonym"}


def test_a_new_series_from_another_site_joins_the_study_without_changing_its_owner_or_attributes(
        pipelines: Pipelines, tmp_path: Path) -> None:
    site_a, site_b = pipelines("siteA"), pipelines("siteB")
    _spool(tmp_path, "siteA", "a1", SMALL)
    site_a.ingest_batch("siteA", "a1")
    [study] = site_a.index.search_studies(StudyQuery())

    def new_series(dataset: pydicom.Dataset) -> None:
        dataset.SeriesInstanceUID = dataset.SeriesInstanceUID[:-3] + "777"
        dataset.SOPInstanceUID = dataset.SOPInstanceUID[:-3] + "777"

    _spool(tmp_path, "siteB", "b1", SMALL, new_series)
    assert site_b.ingest_batch("siteB", "b1").stored == 3
    [after] = site_a.index.search_studies(StudyQuery())
    # B's accession pseudonym is qualified by B (no issuer): the study keeps A's.
    assert (after.accession_number, after.patient_id) == (study.accession_number, study.patient_id)
    assert after.number_of_instances == 6
    rows = site_a.index.dump()
    assert rows["studies"][0]["site_id"] == "siteA"
    assert sorted(r["site_id"] for r in rows["instances"]) == ["siteA"] * 3 + ["siteB"] * 3
    assert _alerts(site_a) == []


def test_an_instance_uid_reused_in_another_study_is_a_conflict(pipelines: Pipelines, tmp_path: Path) -> None:
    site_a, site_b = pipelines("siteA"), pipelines("siteB")
    _spool(tmp_path, "siteA", "a1", SMALL)
    site_a.ingest_batch("siteA", "a1")
    before = {r["sop_instance_uid"]: r["object_key"] for r in site_a.index.dump()["instances"]}

    def other_study(dataset: pydicom.Dataset) -> None:
        dataset.StudyInstanceUID = dataset.StudyInstanceUID[:-3] + "999"
        dataset.SeriesInstanceUID = dataset.SeriesInstanceUID[:-3] + "999"

    _spool(tmp_path, "siteB", "b1", SMALL, other_study)
    assert site_b.ingest_batch("siteB", "b1").quarantined == 3
    assert {r["sop_instance_uid"]: r["object_key"] for r in site_a.index.dump()["instances"]} == before
    assert len(_objects(site_a)) == 3
    assert {a["detail"]["reason"] for a in _alerts(site_a)} == {  # type: ignore[index]
        "the instance is stored in another study or series"}


def test_the_same_instance_re_sent_in_another_transfer_syntax_is_not_a_conflict(
        pipelines: Pipelines, tmp_path: Path) -> None:
    site_a = pipelines("siteA")
    _spool(tmp_path, "siteA", "a1", SMALL)
    site_a.ingest_batch("siteA", "a1")
    before = _objects(site_a)

    def implicit(dataset: pydicom.Dataset) -> None:
        dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian

    _spool(tmp_path, "siteA", "a2", SMALL, implicit)
    assert (site_a.ingest_batch("siteA", "a2").stored, len(_alerts(site_a))) == (3, 0)
    assert _objects(site_a) == before  # the first store stays, its provenance too


def test_the_site_is_named_in_objects_only_when_institution_identity_is_retained(
        pipelines: Pipelines, tmp_path: Path) -> None:
    _spool(tmp_path, "siteA", "a1", SMALL)
    plain = pipelines("siteA")
    plain.ingest_batch("siteA", "a1")
    for key in _objects(plain):
        assert read_provenance(_dataset(plain, key))[0] == ""
    _spool(tmp_path, "siteC", "c1", SampleStudySpec(ct_slices=1, mr_slices=0, ct_size=32, seed=5))
    retaining = pipelines("siteC", ProfileOption.RETAIN_INSTITUTION_IDENTITY)
    retaining.ingest_batch("siteC", "c1")
    [row] = [r for r in retaining.index.dump()["instances"] if r["site_id"] == "siteC"]
    assert read_provenance(_dataset(retaining, row["object_key"]))[0] == "siteC"


def _dataset(pipeline: IngestPipeline, key: str) -> pydicom.Dataset:
    return pydicom.dcmread(BytesIO(pipeline.store.get(key)))


def test_two_sites_storing_one_study_at_once_give_it_exactly_one_owner(
        pipelines: Pipelines, tmp_path: Path) -> None:
    sites = {name: pipelines(name) for name in ("siteA", "siteB")}
    for name in sites:
        _spool(tmp_path, name, "x1", SMALL)
    start = threading.Barrier(len(sites))
    errors: list[BaseException] = []

    def run(name: str) -> None:
        start.wait()
        try:
            sites[name].ingest_batch(name, "x1")
        except BaseException as exc:  # noqa: BLE001 — checked below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in sites]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # A loser of an index race (its series row before the owner's study row) is retried.
    assert all(isinstance(e, TransientPipelineError) for e in errors), errors
    for name, site in sites.items():
        if (tmp_path / "spool" / name / "x1").exists():
            site.ingest_batch(name, "x1")
    pipeline = sites["siteA"]
    [study] = pipeline.index.search_studies(StudyQuery())
    owner = read_study_owner(pipeline.store, study.study_instance_uid)
    assert owner is not None
    rows = pipeline.index.dump()
    assert rows["studies"][0]["site_id"] == owner.site_id
    assert len(pipeline.index.search_instances(InstanceQuery())) == 3
    assert len(_objects(pipeline)) == 3


def test_reindex_keeps_owners_and_leaves_site_out_of_objects(pipelines: Pipelines, tmp_path: Path) -> None:
    site_a = pipelines("siteA")
    _spool(tmp_path, "siteA", "a1", SMALL)
    site_a.ingest_batch("siteA", "a1")
    before = site_a.index.dump()
    reindex(site_a.store, site_a.index)
    assert site_a.index.dump() == before
    assert before["studies"][0]["site_id"] == "siteA"


def test_the_spool_folder_is_removed_after_a_conflict(pipelines: Pipelines, tmp_path: Path) -> None:
    site_a, site_b = pipelines("siteA"), pipelines("siteB")
    _spool(tmp_path, "siteA", "a1", SMALL)
    site_a.ingest_batch("siteA", "a1")
    _spool(tmp_path, "siteB", "b1", SMALL, lambda d: setattr(d, "InstanceNumber", 99))
    site_b.ingest_batch("siteB", "b1")
    assert not (tmp_path / "spool" / "siteB" / "b1").exists()
    assert len(list((tmp_path / "quarantine" / "siteB" / "b1").glob("*.dcm"))) == 3


def test_a_refused_instance_claims_no_study(pipelines: Pipelines, tmp_path: Path) -> None:
    """Site B's first instance of a study not yet stored, refused as a conflict (its SOP
    Instance UID is stored in another study), leaves no owner: site A stores that study
    later and owns it."""
    site_a, site_b = pipelines("siteA"), pipelines("siteB")
    _spool(tmp_path, "siteA", "a1", SMALL)
    site_a.ingest_batch("siteA", "a1")
    target = SampleStudySpec(ct_slices=1, mr_slices=0, ct_size=32, seed=9)
    [target_file] = write_sample_study(tmp_path / "target", target)
    target_study = str(pydicom.dcmread(target_file).StudyInstanceUID)

    def into_target(dataset: pydicom.Dataset) -> None:  # A's instance UIDs, study T
        dataset.StudyInstanceUID = target_study

    _spool(tmp_path, "siteB", "b1", SampleStudySpec(ct_slices=1, mr_slices=0, ct_size=32), into_target)
    assert site_b.ingest_batch("siteB", "b1").quarantined == 1
    archived = site_a.policy.keys.uid(target_study)
    assert read_study_owner(site_a.store, archived) is None
    _spool(tmp_path, "siteA", "a2", target)
    assert site_a.ingest_batch("siteA", "a2").stored == 1
    owner = read_study_owner(site_a.store, archived)
    assert owner is not None and owner.site_id == "siteA"


def test_an_instance_another_site_adds_to_a_series_leaves_the_series_as_it_was(
        pipelines: Pipelines, tmp_path: Path) -> None:
    site_a, site_b = pipelines("siteA"), pipelines("siteB")
    _spool(tmp_path, "siteA", "a1", SMALL)
    site_a.ingest_batch("siteA", "a1")
    before = {r["series_instance_uid"]: r for r in site_a.index.dump()["series"]}

    def relabelled(dataset: pydicom.Dataset) -> None:
        dataset.SOPInstanceUID = dataset.SOPInstanceUID[:-3] + "444"
        dataset.Modality = "PT"
        dataset.SeriesNumber = 99

    _spool(tmp_path, "siteB", "b1", SMALL, relabelled)
    assert site_b.ingest_batch("siteB", "b1").stored == 3
    assert {r["series_instance_uid"]: r for r in site_a.index.dump()["series"]} == before


def test_a_withheld_instance_is_told_under_its_study_domain_uid_until_it_is_stored(
        pipelines: Pipelines, tmp_path: Path) -> None:
    """An instance kept in quarantine because its pixels may show identity is told to the
    study's readers (study, modality, reason) by de-identified UIDs only; a retried batch
    counts it once; stored later (sent again, cleaned), it no longer counts. A conflict
    withholds nothing: the stored instance stays."""
    site_a = pipelines("siteA")
    originals: list[str] = []
    marked: list[str] = []

    def burned_in_once(dataset: pydicom.Dataset) -> None:
        originals.extend(str(dataset[k].value) for k in
                         ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
        if not marked and dataset.Modality == "CT":
            dataset.BurnedInAnnotation = "YES"
            marked.append(str(dataset.SOPInstanceUID))

    _spool(tmp_path, "siteA", "a1", SMALL, burned_in_once)
    report = site_a.ingest_batch("siteA", "a1")
    assert (report.stored, report.quarantined) == (2, 1)
    [study] = site_a.index.search_studies(StudyQuery())
    expected = [WithheldSummary(study.study_instance_uid, "CT", "pixels_may_identify", 1)]
    assert site_a.index.withheld() == expected
    assert site_a.index.withheld(AccessScope(study_instance_uids=frozenset({study.study_instance_uid}))) == expected
    assert site_a.index.withheld(AccessScope(study_instance_uids=frozenset({"2.25.1"}))) == []
    assert site_a.index.withheld(AccessScope(site_ids=frozenset({"siteB"}))) == []
    with site_a.index.engine.connect() as connection:
        rows = [tuple(map(str, r)) for r in connection.execute(text("SELECT * FROM withheld_instances"))]
    assert len(rows) == 1 and not set(originals) & set(rows[0])

    # The same file delivered again (a retried batch): one withheld instance still.
    _spool(tmp_path, "siteA", "a2", SMALL, lambda d: setattr(d, "BurnedInAnnotation", "YES")
           if str(d.SOPInstanceUID) == marked[0] else None)
    assert site_a.ingest_batch("siteA", "a2").quarantined == 1
    assert site_a.index.withheld() == expected
    # Cleaned at the modality and sent again: stored, no longer withheld.
    _spool(tmp_path, "siteA", "a3", SMALL)
    assert site_a.ingest_batch("siteA", "a3").quarantined == 0
    assert site_a.index.withheld() == []
    # A conflicting copy from another site is quarantined but withholds nothing.
    def white_square(dataset: pydicom.Dataset) -> None:
        pixels = dataset.pixel_array.copy()
        pixels[:8, :8] = pixels.max()
        dataset.PixelData = pixels.tobytes()

    _spool(tmp_path, "siteB", "b1", SMALL, white_square)
    assert pipelines("siteB").ingest_batch("siteB", "b1").quarantined == 3
    assert site_a.index.withheld() == []
