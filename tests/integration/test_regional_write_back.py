"""Write-back at the region on the production column (issue 18): site A's node and worker
store a study (Redis, PostgreSQL, SeaweedFS); two regional APIs (no secret, no worker of
their own) take a report and a stored instance sent back by STOW-RS, each processing what
it spooled: the answer names the stored UIDs, searchable at once on the other API, and the
study keeps its owner and patient."""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset

from gateway.sample_study import SampleStudySpec, write_sample_study
from tests.support.cluster import Cluster
from tests.support.services import wait_for
from tests.support.writeback import basic_text_sr, to_bytes


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("region-write-back"), sites=("A",), apis=2,
                 settings={"WORKER__STUDY_QUIET_SECONDS": "1"}) as cluster:
        yield cluster


def _stow(url: str, token: str, study: str, datasets: list[Dataset]) -> httpx.Response:
    boundary = "regional-write-back"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + to_bytes(d) + b"\r\n" for d in datasets) + f"--{boundary}--\r\n".encode()
    return httpx.post(f"{url}/dicom-web/studies/{study}", content=body, timeout=120, headers={
        "Authorization": f"Bearer {token}", "Accept": "application/dicom+json",
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})


def _stored(url: str, token: str, study: str) -> list[Dataset]:
    headers = {"Authorization": f"Bearer {token}"}
    found = httpx.get(f"{url}/dicom-web/studies/{study}/instances", headers=headers, timeout=30).json()
    return [pydicom.dcmread(BytesIO(httpx.get(
        f"{url}/dicom-web/studies/{study}/series/{i['0020000E']['Value'][0]}/instances/"
        f"{i['00080018']['Value'][0]}", timeout=30,
        headers={**headers, "Accept": "application/dicom"}).content)) for i in found]


def test_write_back_through_either_regional_api_lands_in_the_study(
        region: Cluster, tmp_path: Path) -> None:
    files = sorted(write_sample_study(tmp_path / "study", SampleStudySpec(
        ct_slices=3, mr_slices=0, ct_size=64, seed=1801)))
    study = region.study_uid(str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID))
    region.send("A", *files)
    region.wait_indexed(3, study=study)
    first, second = region.apis
    token = region.admin_token
    stored = _stored(first.url, token, study)
    owner_before = region.sql("SELECT site_id, patient_id FROM studies WHERE study_instance_uid = :s",
                              s=study)

    # the study's own completion has run (so only a new request completes it again)
    wait_for(lambda: any(k.endswith("/metadata.json") for k in region.s3_keys(f"studies/{study}/")),
             timeout=60, what="the study's first completion")
    report = basic_text_sr(stored, "Compared with the outside study: stable.")
    answer = _stow(second.url, token, study, [report, stored[0]])
    assert answer.status_code == 202, answer.text  # the report was coerced (cleaned), B000
    items = answer.json()["00081199"]["Value"]
    assert [i["00081155"]["Value"][0] for i in items] == [str(report.SOPInstanceUID),
                                                          str(stored[0].SOPInstanceUID)]
    assert [i.get("00081196", {}).get("Value") for i in items] == [[0xB000], None]
    # searchable at once, through the other regional API
    headers = {"Authorization": f"Bearer {token}"}
    series = httpx.get(f"{first.url}/dicom-web/studies/{study}/series", headers=headers).json()
    assert {s["00080060"]["Value"][0] for s in series} == {"CT", "SR"}
    assert region.count_instances(study=study) == 4
    assert region.sql("SELECT site_id, patient_id FROM studies WHERE study_instance_uid = :s",
                      s=study) == owner_before
    assert region.sql("SELECT site_id FROM instances WHERE sop_instance_uid = :u",
                      u=str(report.SOPInstanceUID)) == [("region",)]
    # each regional API processed what it spooled: nothing left behind
    for api in region.apis:
        assert not list((api.data_dir / "spool").rglob("*.dcm"))
    # and asked site A's worker to complete the study: the report's series gets its metadata
    wait_for(lambda: f"studies/{study}/series/{report.SeriesInstanceUID}/metadata.json"
             in region.s3_keys(f"studies/{study}/"), timeout=60, what="the study completed again")
