"""What comes back lands where it belongs (issue 18, item 1), on both columns (SQLite +
filesystem objects, PostgreSQL + real S3): a report, a measurement report and a segmentation
written into a stored study keep their UIDs and land in that study under its patient; a
stored instance sent back is an idempotent success; nobody forges their way into a study."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from anonymize import DeidentificationPolicy, ProfileOption, PseudonymKeys
from gateway.sample_study import PlantedIdentity, SampleStudySpec, write_sample_study
from spool.replies import take_reply
from storage import (
    AccessRepository,
    AuditQuery,
    IndexRepository,
    InstanceQuery,
    SeriesQuery,
    StudyQuery,
)
from tests.support.columns import COLUMNS, index_engine_and_store
from tests.support.writeback import basic_text_sr, measurement_report, segmentation, to_bytes
from worker import IngestPipeline

SECRET = b"write-back-test-secret-0123456789abcdef"
Pipelines = Callable[..., IngestPipeline]
SPEC = SampleStudySpec(ct_slices=3, mr_slices=1, ct_size=32, mr_size=32,
                       identity=PlantedIdentity(patient_id="IPP-WB-1", accession_number="ACCWB001"))


@pytest.fixture(params=COLUMNS)
def pipelines(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pipelines]:
    """Pipelines of sites (and of the region: `region=True`, no secret) over one store+index."""
    engine, store = index_engine_and_store(request, tmp_path)
    index, access = IndexRepository(engine), AccessRepository(engine)

    def pipeline(site_id: str, *, region: bool = False) -> IngestPipeline:
        policy = DeidentificationPolicy(None if region else PseudonymKeys(SECRET), site_id,
                                        options=frozenset({ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES}))
        return IngestPipeline(store=store, index=index, policy=policy, spool_root=tmp_path / "spool",
                              quarantine_root=tmp_path / "quarantine", audit=access.append_audit,
                              region=region)

    yield pipeline
    engine.dispose()


def _spool(tmp_path: Path, site_id: str, batch: str, datasets: list[Dataset]) -> list[str]:
    directory = tmp_path / "spool" / site_id / batch
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for dataset in datasets:
        name = f"{dataset.SOPInstanceUID}.dcm"
        (directory / name).write_bytes(to_bytes(dataset))
        names.append(name)
    (directory / ".reply").touch()  # as STOW-RS asks: the outcome of each instance
    return names


def _alerts_count(pipeline: IngestPipeline) -> int:
    """Security Alerts in the audit trail."""
    return len(AccessRepository(pipeline.index.engine).search_audit(
        AuditQuery(actions=("instance.conflict",))))


def _stored_study(site: IngestPipeline, tmp_path: Path) -> tuple[str, list[Dataset]]:
    """Ingest the planted study at `site`; its study UID and stored instances (as served)."""
    originals = [pydicom.dcmread(p) for p in write_sample_study(tmp_path / "source", SPEC)]
    _spool(tmp_path, site.policy.site_id, "original", originals)
    assert site.ingest_batch(site.policy.site_id, "original").stored == 4
    [study] = site.index.search_studies(StudyQuery())
    stored = [pydicom.dcmread(BytesIO(site.store.get(key)))
              for key in site.index.instance_keys(study.study_instance_uid)]
    return study.study_instance_uid, stored


def _ct(stored: list[Dataset]) -> list[Dataset]:
    return sorted((d for d in stored if d.Modality == "CT"), key=lambda d: int(d.InstanceNumber))


def test_a_report_written_into_a_stored_study_lands_in_it_with_its_uids(
        pipelines: Pipelines, tmp_path: Path) -> None:
    site = pipelines("siteA")
    study, stored = _stored_study(site, tmp_path)
    [before] = site.index.search_studies(StudyQuery())
    report = basic_text_sr(_ct(stored), "Nodule 6 mm, right upper lobe.", author="Martin^Claire")
    today = report.ContentDate
    [name] = _spool(tmp_path, "siteA", "writeback", [report])
    outcome = site.ingest_batch("siteA", "writeback")
    assert (outcome.stored, outcome.quarantined) == (1, 0)
    # the same study and patient: one study, one more series, the report's own UIDs
    [after] = site.index.search_studies(StudyQuery())
    assert (after.study_instance_uid, after.patient_id) == (study, before.patient_id)
    assert after.number_of_series == before.number_of_series + 1
    assert len(site.index.search_studies(StudyQuery(patient_id=before.patient_id))) == 1
    [row] = site.index.search_instances(InstanceQuery(sop_instance_uids=(str(report.SOPInstanceUID),)))
    assert (row.study_instance_uid, row.series_instance_uid) == (study, str(report.SeriesInstanceUID))
    kept = pydicom.dcmread(BytesIO(site.store.get(row.object_key)))
    # its references to the study's images resolve: every one is a stored instance
    references = [r.ReferencedSOPInstanceUID for s in
                  kept.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
                  for r in s.ReferencedSOPSequence]
    assert len(references) == 3
    assert all(site.index.search_instances(InstanceQuery(sop_instance_uids=(uid,))) for uid in references)
    # the report stays (cleaned), the study's identity is taken, identity added is cleaned
    assert kept.ContentSequence[0].TextValue == "Nodule 6 mm, right upper lobe."
    assert (kept.PatientID, str(kept.PatientName)) == (before.patient_id, f"ANONYMOUS^{before.patient_id}")
    assert kept.AccessionNumber == before.accession_number
    assert "Martin" not in str(kept.get("OperatorsName", ""))
    # no real date enters beside shifted ones: dated like the study
    assert today != before.study_date and kept.ContentDate == before.study_date
    reply = take_reply(tmp_path / "spool", "siteA", "writeback")
    assert reply is not None and reply.instances[name].stored and reply.instances[name].coerced
    assert reply.instances[name].sop_instance_uid == str(report.SOPInstanceUID)


def test_a_segmentation_and_a_measurement_report_land_in_the_study(
        pipelines: Pipelines, tmp_path: Path) -> None:
    site = pipelines("siteA")
    study, stored = _stored_study(site, tmp_path)
    ct = _ct(stored)
    seg, sr = segmentation(ct), measurement_report(ct[0])
    _spool(tmp_path, "siteA", "ai", [seg, sr])
    assert site.ingest_batch("siteA", "ai").stored == 2
    series = {s.series_instance_uid: s for s in site.index.search_series(SeriesQuery(study_instance_uid=study))}
    assert {str(seg.SeriesInstanceUID), str(sr.SeriesInstanceUID)} <= set(series)
    assert series[str(seg.SeriesInstanceUID)].modality == "SEG"
    [seg_row] = site.index.search_instances(InstanceQuery(sop_instance_uids=(str(seg.SOPInstanceUID),)))
    kept = pydicom.dcmread(BytesIO(site.store.get(seg_row.object_key)))
    referenced = {item.ReferencedSOPInstanceUID for frame in kept.PerFrameFunctionalGroupsSequence
                  for derivation in frame.DerivationImageSequence for item in derivation.SourceImageSequence}
    assert referenced == {str(d.SOPInstanceUID) for d in ct}
    assert kept.pixel_array.sum() == seg.pixel_array.sum() > 0
    assert len(site.index.search_studies(StudyQuery())) == 1


def test_a_stored_instance_sent_back_is_an_idempotent_success(
        pipelines: Pipelines, tmp_path: Path) -> None:
    site = pipelines("siteA")
    study, stored = _stored_study(site, tmp_path)
    dump = site.index.dump()
    objects = {key: site.store.get(key) for key in site.index.instance_keys(study)}
    returned = []
    for number, dataset in enumerate(stored):
        copy = pydicom.dcmread(BytesIO(to_bytes(dataset)))
        if number == 0:  # a PACS adds its private attributes
            copy.private_block(0x0029, "SOME PACS", create=True).add_new(0x01, "LO", "routing")
        if number == 1:  # and sends in another transfer syntax
            copy.decompress(generate_instance_uid=False)
            copy.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        returned.append(copy)
    names = _spool(tmp_path, "siteA", "resent", returned)
    report = site.ingest_batch("siteA", "resent")
    assert (report.stored, report.quarantined) == (4, 0)
    assert {key: site.store.get(key) for key in site.index.instance_keys(study)} == objects
    assert site.index.dump()["studies"] == dump["studies"]
    assert len(site.index.dump()["instances"]) == len(dump["instances"])
    reply = take_reply(tmp_path / "spool", "siteA", "resent")
    assert reply is not None
    assert [reply.instances[n].coerced for n in names] == [False] * 4
    # a write-back sent twice (a retried upload) is one instance too
    sr = basic_text_sr(_ct(stored), "Stable.")
    for batch in ("once", "twice"):
        _spool(tmp_path, "siteA", batch, [sr])
        assert site.ingest_batch("siteA", batch).stored == 1
    assert len(site.index.search_instances(InstanceQuery(sop_instance_uids=(str(sr.SOPInstanceUID),)))) == 1


def test_nobody_forges_their_way_into_a_stored_study(pipelines: Pipelines, tmp_path: Path) -> None:
    site_a, site_b = pipelines("siteA"), pipelines("siteB")
    study, stored = _stored_study(site_a, tmp_path)
    [before] = site_a.index.search_studies(StudyQuery())
    # another patient's identity under the stored study UID: not of the domain — de-identified
    # like any upload, it becomes a study of its own, and the stored one is unchanged
    forged = basic_text_sr(_ct(stored), "Other patient.")
    forged.PatientID, forged.PatientName = "IPP-STRANGER", "STRANGER^Eve"
    _spool(tmp_path, "siteA", "forged", [forged])
    assert site_a.ingest_batch("siteA", "forged").stored == 1
    assert site_a.index.search_studies(StudyQuery(study_instance_uids=(study,))) == [before]
    assert not site_a.index.search_instances(InstanceQuery(sop_instance_uids=(str(forged.SOPInstanceUID),)))
    # another content under a stored SOP Instance UID: a conflict, quarantined, audited
    altered = pydicom.dcmread(BytesIO(to_bytes(_ct(stored)[0])))
    altered.SeriesDescription = "replaced"
    [name] = _spool(tmp_path, "siteA", "altered", [altered])
    assert site_a.ingest_batch("siteA", "altered").quarantined == 1
    reply = take_reply(tmp_path / "spool", "siteA", "altered")
    assert reply is not None and reply.instances[name].failure_reason == 0x0111
    # a stored instance of A's study sent back to site B (its PACS retrieved it): nothing added
    resent = pydicom.dcmread(BytesIO(to_bytes(_ct(stored)[1])))
    _spool(tmp_path, "siteB", "b-resends", [resent])
    assert (site_b.ingest_batch("siteB", "b-resends").stored, _alerts_count(site_b)) == (1, 1)
    assert site_b.index.instance_site(str(resent.SOPInstanceUID)) == "siteA"
    # site B cannot write into site A's study through its own node or API: the region can
    report = basic_text_sr(_ct(stored), "Second opinion.")
    [name] = _spool(tmp_path, "siteB", "b-writes", [report])
    assert site_b.ingest_batch("siteB", "b-writes").quarantined == 1
    reply = take_reply(tmp_path / "spool", "siteB", "b-writes")
    assert reply is not None and reply.instances[name].failure_reason == 0x0124
    assert "write back through the regional API" in reply.instances[name].reason
    region = pipelines("region", region=True)
    _spool(tmp_path, "region", "r-writes", [report])
    assert region.ingest_batch("region", "r-writes").stored == 1
    [row] = region.index.search_instances(InstanceQuery(sop_instance_uids=(str(report.SOPInstanceUID),)))
    assert row.study_instance_uid == study
    dump = region.index.dump()
    assert {r["site_id"] for r in dump["studies"] if r["study_instance_uid"] == study} == {"siteA"}


def test_the_region_takes_only_objects_of_the_domain(pipelines: Pipelines, tmp_path: Path) -> None:
    region = pipelines("region", region=True)
    identified = [pydicom.dcmread(p) for p in write_sample_study(tmp_path / "identified", SPEC)][:1]
    [name] = _spool(tmp_path, "region", "identified", identified)
    report = region.ingest_batch("region", "identified")
    assert (report.stored, report.quarantined) == (0, 1)
    assert region.index.search_studies(StudyQuery()) == []
    reply = take_reply(tmp_path / "spool", "region", "identified")
    assert reply is not None and reply.instances[name].failure_reason == 0x0124
    reason = json.loads(next((tmp_path / "quarantine" / "region").rglob("*.reason.json")).read_text())
    assert reason["reason"] == "NotOfTheDomain" and "IPP-WB-1" not in json.dumps(reason)


def test_a_write_back_in_another_transfer_syntax_keeps_its_pixels(
        pipelines: Pipelines, tmp_path: Path) -> None:
    site = pipelines("siteA")
    _, stored = _stored_study(site, tmp_path)
    seg = segmentation(_ct(stored))
    seg.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    _spool(tmp_path, "siteA", "seg", [seg])
    assert site.ingest_batch("siteA", "seg").stored == 1
    [row] = site.index.search_instances(InstanceQuery(sop_instance_uids=(str(seg.SOPInstanceUID),)))
    assert (pydicom.dcmread(BytesIO(site.store.get(row.object_key))).pixel_array
            == seg.pixel_array).all()
