"""The regional API (HTTP__ROLE=region) against a real server: STOW-RS takes only objects of
the domain, lookups by original identifiers are refused, and the audit trail keeps no value a
caller sent that could identify (issue 17, item 4)."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from gateway.sample_study import PlantedIdentity, SampleStudySpec, write_sample_study
from storage import InstanceQuery, StudyQuery
from tests.support.dicomweb_server import TOKEN, DicomwebServer
from tests.support.writeback import basic_text_sr, to_bytes
from web_viewer_api.dicomweb.stow import receive_parts, screen_part

ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomwebServer]:
    with DicomwebServer(tmp_path_factory.mktemp("region"), region=True) as server:
        yield server


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomwebServer]:
    with DicomwebServer(tmp_path_factory.mktemp("site")) as server:
        yield server


def _stow(server: DicomwebServer, instances: list[bytes], path: str = "/studies") -> httpx.Response:
    boundary = "region-boundary"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
                    + b"\r\n" for data in instances) + f"--{boundary}--\r\n".encode()
    return httpx.post(f"{server.url}{path}", content=body, timeout=30, headers={
        **ADMIN, "Accept": "application/dicom+json",
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})


def _identified(tmp_path: Path, seed: int) -> list[bytes]:
    paths = write_sample_study(tmp_path / f"identified-{seed}", SampleStudySpec(
        ct_slices=2, mr_slices=0, ct_size=64, seed=seed,
        identity=PlantedIdentity(patient_id=f"IPP-REGION-{seed}")))
    return [p.read_bytes() for p in sorted(paths)]


def _stored_instance(server: DicomwebServer) -> pydicom.Dataset:
    """A stored (de-identified) instance, as the region serves it."""
    [study] = server.index.search_studies(StudyQuery(limit=1))
    key = server.index.instance_keys(study.study_instance_uid)[0]
    return pydicom.dcmread(io.BytesIO(server.store.get(key)))


def _spooled(server: DicomwebServer) -> list[Path]:
    return list((server.pipeline.spool_root / server.spool_site).rglob("*.dcm"))


def test_region_refuses_identified_instances_with_the_reason(region: DicomwebServer,
                                                             tmp_path: Path) -> None:
    before = (len(region.enqueued), len(_spooled(region)))
    answer = _stow(region, _identified(tmp_path, 31))
    assert answer.status_code == 409, answer.text
    failed = answer.json()["00081198"]["Value"]
    assert [item["00081197"]["Value"][0] for item in failed] == [0xC001, 0xC001]
    assert "00081199" not in answer.json()
    assert "not of the pseudonymization domain" in answer.headers["Warning"]
    assert (len(region.enqueued), len(_spooled(region))) == before  # nothing kept


def test_region_refuses_a_claimed_deidentified_instance_outside_every_stored_study(
        region: DicomwebServer, tmp_path: Path) -> None:
    dataset = pydicom.dcmread(io.BytesIO(_identified(tmp_path, 32)[0]))
    dataset.PatientIdentityRemoved = "YES"  # a claim: its study is no study of the domain
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    answer = _stow(region, [buffer.getvalue()])
    assert answer.status_code == 409
    assert answer.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC001]


def test_region_takes_an_object_of_the_domain(region: DicomwebServer) -> None:
    dataset = _stored_instance(region)
    assert dataset.PatientIdentityRemoved == "YES"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    answer = _stow(region, [buffer.getvalue()])
    assert answer.status_code == 200, answer.text
    assert "Warning" not in answer.headers
    [referenced] = answer.json()["00081199"]["Value"]
    assert referenced["00081155"]["Value"] == [str(dataset.SOPInstanceUID)]
    # under another patient ID than the study's pseudonym, the same object is refused: it
    # may be identified (a claim of PatientIdentityRemoved proves nothing)
    dataset.PatientID = "IPP-REGION-FORGED"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    assert _stow(region, [buffer.getvalue()]).status_code == 409


def test_site_still_takes_identified_uploads(site: DicomwebServer, tmp_path: Path) -> None:
    sent = _identified(tmp_path, 33)
    answer = _stow(site, sent)
    # Stored de-identified: every instance coerced (B000), so 202 (PS3.18 Table 10.5.3-1).
    assert answer.status_code == 202, answer.text
    referenced = answer.json()["00081199"]["Value"]
    assert [item["00081196"]["Value"] for item in referenced] == [[0xB000], [0xB000]]
    sent_uids = {str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID) for data in sent}
    stored_uids = {item["00081155"]["Value"][0] for item in referenced}
    assert not stored_uids & sent_uids  # the UIDs it is stored under, not those sent
    for uid in stored_uids:  # searchable as soon as answered
        assert site.index.find_instance(uid) is not None


def test_region_refuses_lookups_by_original_identifiers(region: DicomwebServer) -> None:
    for answer in (
            httpx.post(f"{region.root}/api/site/lookup", headers=ADMIN,
                       json={"accession_number": "ACC2026112301"}),
            httpx.get(f"{region.root}/api/studies/lookup", headers=ADMIN,
                      params={"accession_number": "ACC2026112301"})):
        assert answer.status_code == 404
        assert "computed at the producing site" in answer.json()["error"]["message"]


def _audit(server: DicomwebServer) -> list[dict[str, object]]:
    events = httpx.get(f"{server.root}/api/audit?format=jsonl&limit=1000", headers=ADMIN)
    return [json.loads(line) for line in events.text.splitlines()]


def test_audit_keeps_no_value_a_caller_sent(region: DicomwebServer) -> None:
    original = "1.2.826.0.1.3680043.10.9999.424242"
    assert httpx.get(f"{region.url}/studies", params={"PatientID": "IPP-AUDIT-77", "limit": "5"},
                     headers=ADMIN).status_code == 200
    assert httpx.get(f"{region.url}/studies/{original}/metadata", headers=ADMIN).status_code == 404
    assert httpx.get(f"{region.url}/studies/{original}/series", headers=ADMIN).status_code == 200
    stored = _stored_instance(region)
    study = str(stored.StudyInstanceUID)
    assert httpx.get(f"{region.url}/studies/{study}/metadata", headers=ADMIN).status_code == 200
    events = _audit(region)
    text = json.dumps(events)
    assert "IPP-AUDIT-77" not in text and original not in text
    resources = {e["resource"]: e for e in events}
    assert "/dicom-web/studies?PatientID=(withheld)&limit=5" in resources
    failed = resources["/dicom-web/studies/{study}/metadata"]
    assert failed["status_code"] == 404 and failed["study_instance_uid"] is None
    assert resources["/dicom-web/studies/{study}/series"]["status_code"] == 200
    # a retrieval that succeeded named a stored study: its path and study are kept
    assert resources[f"/dicom-web/studies/{study}/metadata"]["study_instance_uid"] == study


def test_site_stow_audit_keeps_no_original_study_uid(site: DicomwebServer, tmp_path: Path) -> None:
    instances = _identified(tmp_path, 34)
    original = str(pydicom.dcmread(io.BytesIO(instances[0])).StudyInstanceUID)
    assert _stow(site, instances, f"/studies/{original}").status_code == 202  # coerced
    events = [e for e in _audit(site) if e["action"] == "dicomweb.store"]
    assert events and original not in json.dumps(events)
    assert events[-1]["resource"] == "/dicom-web/studies/{study}"


def _files_seen_while_receiving(folder: Path, instances: list[bytes],
                                study_patient: Callable[[str], str | None] | None
                                ) -> tuple[int, list]:
    """Feed a STOW-RS body to receive_parts 1 KB at a time; the most files the folder held
    between two chunks, and the parts."""
    boundary = b"screen-boundary"
    body = b"".join(b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n"
                    for data in instances) + b"--" + boundary + b"--\r\n"
    most = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal most
        for start in range(0, len(body), 1024):
            yield body[start:start + 1024]
            most = max(most, sum(1 for _ in folder.iterdir()))

    parts = asyncio.run(receive_parts(chunks(), boundary, folder, 1 << 30, study_patient))
    return most, parts


def test_region_never_writes_a_refused_instance_to_disk(tmp_path: Path) -> None:
    identified = _identified(tmp_path, 35)
    assert len(identified[0]) > 4 * 1024  # the parts span many chunks
    # every study stored (under a pseudonym): the parts' original patient ID is no pseudonym
    most, parts = _files_seen_while_receiving(tmp_path / "region", identified,
                                              lambda _: "PSTOREDPSEUDONYM")
    assert most == 0 and not any((tmp_path / "region").iterdir())
    assert [p.refused[2] for p in parts] == [0xC001, 0xC001]  # type: ignore[index]
    # a site's API writes each part as it arrives (what the region must not do)
    most, parts = _files_seen_while_receiving(tmp_path / "site", identified, None)
    assert most >= 1 and all(p.refused is None and p.path.is_file() for p in parts)


def test_region_screening_reads_only_the_head_of_a_part(tmp_path: Path) -> None:
    [data, *_] = _identified(tmp_path, 36)
    dataset = pydicom.dcmread(io.BytesIO(data))
    dataset.PatientIdentityRemoved = "YES"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    domain = buffer.getvalue()
    study, patient = str(dataset.StudyInstanceUID), str(dataset.PatientID)

    def stored(uid: str) -> str | None:
        return patient if uid == study else None

    assert screen_part(domain[:64], False, stored) is False  # more needed
    assert screen_part(domain[:4096], False, stored) is None  # decided early
    assert screen_part(domain[:4096], False, lambda uid: None)[2] == 0xC001  # type: ignore[index]
    assert screen_part(domain[:4096], False, lambda uid: "PANOTHER")[2] == 0xC001  # type: ignore[index]
    assert screen_part(b"not dicom", True, lambda uid: "P") == ("", "", 0xC000)


def test_region_takes_a_viewers_report_that_does_not_claim_identity_removed(
        region: DicomwebServer) -> None:
    """A viewer's SR copies the study's patient and study attributes, not necessarily
    PatientIdentityRemoved: the study's UID and its patient pseudonym make it an object of
    the domain, which lands in the study."""
    stored = _stored_instance(region)
    report = basic_text_sr([stored], "Reviewed at the region.")
    del report.PatientIdentityRemoved
    answer = _stow(region, [to_bytes(report)], f"/studies/{stored.StudyInstanceUID}")
    assert answer.status_code == 202, answer.text  # cleaned (coerced): B000
    [referenced] = answer.json()["00081199"]["Value"]
    assert referenced["00081155"]["Value"] == [str(report.SOPInstanceUID)]
    [row] = region.index.search_instances(InstanceQuery(sop_instance_uids=(str(report.SOPInstanceUID),)))
    assert row.study_instance_uid == str(stored.StudyInstanceUID)


def test_region_refuses_dicom_json_uploads(region: DicomwebServer) -> None:
    answer = httpx.post(f"{region.url}/studies", content=b"--b\r\n\r\n{}\r\n--b--\r\n", headers={
        **ADMIN, "Content-Type": 'multipart/related; type="application/dicom+json"; boundary=b'})
    assert answer.status_code == 415 and "regional API" in answer.json()["error"]["message"]
