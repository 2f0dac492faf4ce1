"""A single instance retrieved as one application/dicom body (PS3.18 §8.7.3, §10.4.4):
named by Accept for an Instance Resource only; for a study or series a single-part media
type is ignored, and when none other remains the answer is 406. Over real HTTP (httpx and
dicomweb-client), on the DICOMweb root and on a share's."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from storage import StudyQuery
from tests.support.dicomweb_server import TOKEN, DicomwebServer

EXPLICIT = "1.2.840.10008.1.2.1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomwebServer]:
    with DicomwebServer(tmp_path_factory.mktemp("single-part")) as running:
        yield running


@pytest.fixture(scope="module")
def uids(server: DicomwebServer) -> tuple[str, str, str]:
    [study] = server.index.search_studies(StudyQuery())
    series, sop, _sop_class, _key = server.index.study_instances(study.study_instance_uid)[0]
    return study.study_instance_uid, series, sop


def _stored(server: DicomwebServer, sop: str) -> bytes:
    found = server.index.find_instance(sop)
    assert found is not None
    return (server.store.root / found[0]).read_bytes()


def _get(url: str, accept: str) -> httpx.Response:
    return httpx.get(url, headers={**AUTH, "Accept": accept}, timeout=30)


def test_an_instance_asked_as_application_dicom_is_one_part10_body(
        server: DicomwebServer, uids: tuple[str, str, str]) -> None:
    study, series, sop = uids
    response = _get(f"{server.url}/studies/{study}/series/{series}/instances/{sop}", "application/dicom")
    assert response.status_code == 200
    assert response.headers["content-type"] == f"application/dicom; transfer-syntax={EXPLICIT}"
    assert "Accept" in response.headers["vary"] and response.headers["etag"]
    instance = pydicom.dcmread(io.BytesIO(response.content))
    assert instance.SOPInstanceUID == sop and instance.file_meta.TransferSyntaxUID == EXPLICIT
    stored = pydicom.dcmread(io.BytesIO(_stored(server, sop)))
    assert np.array_equal(instance.pixel_array, stored.pixel_array)


def test_any_transfer_syntax_sends_the_stored_object_as_it_is(
        server: DicomwebServer, uids: tuple[str, str, str]) -> None:
    study, series, sop = uids
    stored = _stored(server, sop)
    syntax = pydicom.dcmread(io.BytesIO(stored)).file_meta.TransferSyntaxUID
    response = _get(f"{server.url}/studies/{study}/series/{series}/instances/{sop}",
                    "application/dicom; transfer-syntax=*")
    assert response.status_code == 200
    assert response.headers["content-type"] == f"application/dicom; transfer-syntax={syntax}"
    assert response.content == stored


def test_the_better_quality_range_decides_between_single_part_and_multipart(
        server: DicomwebServer, uids: tuple[str, str, str]) -> None:
    study, series, sop = uids
    url = f"{server.url}/studies/{study}/series/{series}/instances/{sop}"
    single = _get(url, 'multipart/related; type="application/dicom"; q=0.5, application/dicom')
    assert single.headers["content-type"].startswith("application/dicom;")
    parts = _get(url, 'application/dicom; q=0.5, multipart/related; type="application/dicom"')
    assert parts.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    assert single.headers["etag"] != parts.headers["etag"]  # two representations, two validators
    assert _get(url, "*/*").headers["content-type"].startswith("multipart/related")


def test_a_syntax_the_server_cannot_produce_in_a_single_part_is_406(
        server: DicomwebServer, uids: tuple[str, str, str]) -> None:
    study, series, sop = uids
    response = _get(f"{server.url}/studies/{study}/series/{series}/instances/{sop}",
                    "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.50")
    assert response.status_code == 406
    assert response.json()["error"]["code"]


@pytest.mark.parametrize("accept", ["*/*; transfer-syntax=../../etc",
                                    "multipart/*; transfer-syntax=1.2.3.4.5",
                                    'multipart/related; type="application/dicom"; transfer-syntax=x'])
def test_a_transfer_syntax_parameter_that_names_no_syntax_of_ours_is_406(
        server: DicomwebServer, uids: tuple[str, str, str], accept: str) -> None:
    """A review finding: `*/*; transfer-syntax=../../etc` was answered 200."""
    study, series, sop = uids
    for url in (f"{server.url}/studies/{study}",
                f"{server.url}/studies/{study}/series/{series}/instances/{sop}"):
        response = _get(url, accept)
        assert response.status_code == 406, (url, response.status_code)
        assert response.json()["error"]["code"]


@pytest.mark.parametrize("resource", ["studies/{study}", "studies/{study}/series/{series}"])
def test_a_study_or_series_asked_only_as_a_single_part_is_406(
        server: DicomwebServer, uids: tuple[str, str, str], resource: str) -> None:
    study, series, _sop = uids
    url = f"{server.url}/{resource.format(study=study, series=series)}"
    refused = _get(url, "application/dicom")
    assert refused.status_code == 406
    assert "single instance" in refused.json()["error"]["message"]
    # The single-part range is ignored, the multipart one that remains answered.
    answered = _get(url, 'application/dicom, multipart/related; type="application/dicom"; q=0.2')
    assert answered.status_code == 200
    assert answered.headers["content-type"].startswith('multipart/related; type="application/dicom"')


def test_dicomweb_client_reads_the_instance_either_way(
        server: DicomwebServer, uids: tuple[str, str, str]) -> None:
    study, series, sop = uids
    client = DICOMwebClient(url=server.url, headers=AUTH)
    for media_types in ((("application/dicom", EXPLICIT),), (("application/dicom", "*"),)):
        assert client.retrieve_instance(study, series, sop, media_types=media_types).SOPInstanceUID == sop


def test_a_share_link_answers_a_single_part_the_same_way(
        server: DicomwebServer, uids: tuple[str, str, str]) -> None:
    study, series, sop = uids
    created = httpx.post(f"{server.root}/api/shares", headers=AUTH, timeout=30, json={
        "study_uids": [study], "expires_in": 3600, "allow_download": True})
    assert created.status_code == 201, created.text
    shared = f"{server.root}/s/{created.json()['token']}/dicom-web"
    instance = _get(f"{shared}/studies/{study}/series/{series}/instances/{sop}", "application/dicom")
    assert instance.status_code == 200
    assert instance.headers["content-type"] == f"application/dicom; transfer-syntax={EXPLICIT}"
    assert pydicom.dcmread(io.BytesIO(instance.content)).SOPInstanceUID == sop
    assert _get(f"{shared}/studies/{study}", "application/dicom").status_code == 406
