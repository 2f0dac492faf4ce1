"""DICOMweb against a real HTTP server on loopback, driven by the independent
`dicomweb-client` package (QIDO-RS at every level, WADO-RS instances, metadata, frames,
rendered) plus raw requests for the error cases."""

from __future__ import annotations

import io
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from gateway.sample_study import SampleStudySpec, write_sample_study
from storage import FilesystemObjectStore, InstanceQuery, StorageError, StudyQuery
from tests.support.dicomweb_server import TOKEN, DicomwebServer
from tests.support.page_cache import opened_under, page_cache_reads_work
from tests.support.services import wait_for
from web_viewer_api import loop_reads
from web_viewer_api.loop_reads import InlineReads, OpenedObject, StreamedPart, open_stored


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomwebServer]:
    with DicomwebServer(tmp_path_factory.mktemp("dicomweb")) as running:
        yield running


@pytest.fixture
def client(server: DicomwebServer) -> DICOMwebClient:
    return DICOMwebClient(url=server.url, headers={"Authorization": f"Bearer {TOKEN}"})


def _uids(server: DicomwebServer) -> tuple[str, str, str]:
    """The sample study imported at start (STOW tests add others to the same server)."""
    [study] = [s for s in server.index.search_studies(StudyQuery()) if s.number_of_instances == 6]
    instances = server.index.study_instances(study.study_instance_uid)
    ct = next(i for i in instances if i[2] == "1.2.840.10008.5.1.4.1.1.2")
    return study.study_instance_uid, ct[0], ct[1]


def test_search_at_every_level(client: DICOMwebClient, server: DicomwebServer) -> None:
    study, series, sop = _uids(server)
    assert study in [s["0020000D"]["Value"][0] for s in client.search_for_studies()]
    found_series = client.search_for_series(study_instance_uid=study)
    assert sorted(s["00080060"]["Value"][0] for s in found_series) == ["CT", "MR"]
    assert len(client.search_for_series(search_filters={"Modality": "MR"})) == 1
    instances = client.search_for_instances(study_instance_uid=study, series_instance_uid=series)
    assert len(instances) == 4
    assert len(client.search_for_instances(study_instance_uid=study)) == 6
    assert [i["00080018"]["Value"][0] for i in
            client.search_for_instances(search_filters={"SOPInstanceUID": sop})] == [sop]


def test_retrieve_study_series_and_instance(client: DICOMwebClient, server: DicomwebServer) -> None:
    study, series, sop = _uids(server)
    assert len(client.retrieve_study(study)) == 6
    assert len(client.retrieve_series(study, series)) == 4
    stored = pydicom.dcmread(server.store.root / server.index.find_instance(sop)[0])  # type: ignore[index]
    as_stored = client.retrieve_instance(study, series, sop,
                                         media_types=(("application/dicom", "*"),))
    assert as_stored.file_meta.TransferSyntaxUID == stored.file_meta.TransferSyntaxUID
    explicit = client.retrieve_instance(study, series, sop,
                                        media_types=(("application/dicom", "1.2.840.10008.1.2.1"),))
    assert explicit.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert np.array_equal(explicit.pixel_array, stored.pixel_array)


def test_series_metadata_has_absolute_bulk_data_uris(client: DICOMwebClient, server: DicomwebServer) -> None:
    study, series, _ = _uids(server)
    metadata = client.retrieve_series_metadata(study, series)
    assert len(metadata) == 4
    uri = metadata[0]["7FE00010"]["BulkDataURI"]
    assert uri.startswith(server.url + "/studies/" + study)


def test_frames_uncompressed_and_as_stored(client: DICOMwebClient, server: DicomwebServer) -> None:
    study, series, sop = _uids(server)
    [raw] = client.retrieve_instance_frames(study, series, sop, frame_numbers=[1],
                                            media_types=("application/octet-stream",))
    assert len(raw) == 128 * 128 * 2
    # As stored (HTJ2K, image/jphc: PS3.18 Table 8.7.3-5; dicomweb-client does not know it)
    answer = httpx.get(f"{server.url}/studies/{study}/series/{series}/instances/{sop}/frames/1",
                       headers={"Authorization": f"Bearer {TOKEN}", "Accept": 'multipart/related; '
                                'type="image/jphc"; transfer-syntax=1.2.840.10008.1.2.4.201'})
    assert answer.status_code == 200
    assert 'type="image/jphc"' in answer.headers["content-type"]
    htj2k = answer.content.split(b"\r\n\r\n", 1)[1]
    assert htj2k[:4] == b"\xff\x4f\xff\x51" and len(htj2k) < len(raw)  # SOC, SIZ
    # A client that reads only JPEG-LS gets the frame re-encoded, decoding to the same pixels
    [jls] = client.retrieve_instance_frames(study, series, sop, frame_numbers=[1],
                                            media_types=(("image/jls", "1.2.840.10008.1.2.4.80"),))
    assert jls[:2] == b"\xff\xd8" and len(jls) < len(raw)
    from libjpeg.utils import decode as libjpeg_decode

    assert libjpeg_decode(bytes(jls)).tobytes() == bytes(raw)


def test_rendered_and_thumbnail(client: DICOMwebClient, server: DicomwebServer) -> None:
    study, series, sop = _uids(server)
    png = client.retrieve_instance_rendered(study, series, sop, media_types=("image/png",))
    assert png.startswith(b"\x89PNG")
    jpeg = client.retrieve_instance_rendered(study, series, sop, media_types=("image/jpeg",),
                                             params={"window": "40,400", "viewport": "64,64"})
    assert jpeg[:2] == b"\xff\xd8"
    response = httpx.get(f"{server.url}/studies/{study}/thumbnail",
                         headers={"Authorization": f"Bearer {TOKEN}", "Accept": "image/png"})
    assert response.status_code == 200 and response.content.startswith(b"\x89PNG")


def test_frames_of_a_multiframe_instance_render_and_thumbnail_one_by_one(
        server: DicomwebServer) -> None:
    """A 10-frame MR: each frame renders its own pixels; a frame thumbnail is that frame
    fitted to 128 pixels; a missing frame is a 404, a bad frame list a 400."""
    import io
    import shutil

    from PIL import Image
    from pydicom.data import get_testdata_file

    from storage import InstanceRecord

    path = get_testdata_file("emri_small.dcm")
    dataset = pydicom.dcmread(path)
    assert int(dataset.NumberOfFrames) == 10
    (server.store.root / "multiframe").mkdir()
    shutil.copy(path, server.store.root / "multiframe" / "emri.dcm")
    server.index.upsert_instance(InstanceRecord.from_dataset(
        dataset, object_key="multiframe/emri.dcm", size_bytes=Path(path).stat().st_size,
        sha256="0" * 64, transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID),
        site_id="site1"))
    base = (f"{server.url}/studies/{dataset.StudyInstanceUID}/series/{dataset.SeriesInstanceUID}"
            f"/instances/{dataset.SOPInstanceUID}")
    png = {"Authorization": f"Bearer {TOKEN}", "Accept": "image/png"}

    def image(resource: str) -> Image.Image:
        response = httpx.get(f"{base}/{resource}", headers=png)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        return Image.open(io.BytesIO(response.content))

    frames = [image(f"frames/{n}/rendered").tobytes() for n in (1, 2, 10)]
    assert len(set(frames)) == 3  # three different frames, not the first one three times
    thumbnail = image("frames/2/thumbnail")
    assert max(thumbnail.size) <= 128
    assert thumbnail.tobytes() == image("frames/2/rendered?viewport=128,128").tobytes()
    # A list: the middle frame represents it.
    assert image("frames/1,2,10/thumbnail").tobytes() == thumbnail.tobytes()
    for resource, status in (("frames/11/thumbnail", 404), ("frames/1,2,11/thumbnail", 404),
                             ("frames/0/thumbnail", 400),
                             ("frames/x/thumbnail", 400), ("frames/11/rendered", 404)):
        response = httpx.get(f"{base}/{resource}", headers=png)
        assert response.status_code == status, resource
        assert response.json()["error"]["code"]


@pytest.mark.parametrize(("path", "accept", "status"), [
    ("/studies/2.25.1", 'multipart/related; type="application/dicom"', 404),
    ("/studies/not-a-uid/series", "application/dicom+json", 400),
    ("/studies/{study}", 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50', 406),
    ("/studies/{study}/series/{series}/instances/{sop}/frames/0", "application/octet-stream", 400),
    ("/studies/{study}/series/{series}/instances/{sop}/frames/99", "application/octet-stream", 404),
    ("/series?NotAKeyword=1", "application/dicom+json", 400),
    ("/studies?fuzzymatching=true&PatientName=" + "+".join("abcdefghi"), "application/dicom+json", 400),
])
def test_errors_are_json_4xx(server: DicomwebServer, path: str, accept: str, status: int) -> None:
    study, series, sop = _uids(server)
    url = server.url + path.format(study=study, series=series, sop=sop)
    response = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}", "Accept": accept})
    assert response.status_code == status
    assert response.json()["error"]["code"]


def test_streamed_retrieve_is_chunked(server: DicomwebServer) -> None:
    study, _, _ = _uids(server)
    started = time.perf_counter()
    with httpx.stream("GET", f"{server.url}/studies/{study}",
                      headers={"Authorization": f"Bearer {TOKEN}",
                               "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}) as response:
        assert response.headers.get("transfer-encoding") == "chunked"
        assert "boundary=" in response.headers["content-type"]
        total = sum(len(chunk) for chunk in response.iter_bytes())
    assert total > 0 and time.perf_counter() - started < 60


def _multipart(parts: list[tuple[str, bytes]], boundary: str = "stow-test-boundary") -> bytes:
    chunks = []
    for content_type, body in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + body + b"\r\n")
    return b"".join(chunks) + f"--{boundary}--\r\n".encode()


def _stow_headers(boundary: str = "stow-test-boundary") -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", "Accept": "application/dicom+json",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}


def _new_study(tmp_path: Path, seed: int, count: int = 2) -> list[Path]:
    return write_sample_study(tmp_path / f"stow-{seed}", SampleStudySpec(
        ct_slices=count, mr_slices=0, ct_size=64, seed=seed))


def test_stow_with_dicomweb_client_goes_through_the_pipeline(
    client: DICOMwebClient, server: DicomwebServer, tmp_path: Path,
) -> None:
    paths = _new_study(tmp_path, seed=21)
    before = len(server.index.search_studies(StudyQuery()))
    response = client.store_instances([pydicom.dcmread(p) for p in paths])
    assert len(response.ReferencedSOPSequence) == 2 and "FailedSOPSequence" not in response
    # read-your-writes: searchable under the UIDs the answer names, as soon as answered
    assert len(server.index.search_studies(StudyQuery())) == before + 1
    for item in response.ReferencedSOPSequence:
        assert item.WarningReason == 0xB000  # de-identified: coerced
        assert client.retrieve_instance(*item.RetrieveURL.split("/studies/")[1]
                                        .replace("/series/", "/").replace("/instances/", "/")
                                        .split("/")).SOPInstanceUID == item.ReferencedSOPInstanceUID


def test_stow_reports_what_the_pixel_policy_refuses_as_failed_before_answering(
        server: DicomwebServer, tmp_path: Path) -> None:
    """An instance whose pixels may show identity (burned-in annotation, no mask
    configured) will not be stored: the answer says so (0x0124 and why), it does not list
    it as stored; the other instance of the request is stored and searchable."""
    kept, refused = _new_study(tmp_path, seed=27, count=2)
    annotated = pydicom.dcmread(refused)
    annotated.BurnedInAnnotation = "YES"
    body = _multipart([("application/dicom", kept.read_bytes()),
                       ("application/dicom", _bytes(annotated))])
    response = httpx.post(f"{server.url}/studies", content=body, headers=_stow_headers(),
                          timeout=60)
    assert response.status_code == 202, response.text
    document = response.json()
    [failed] = document["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0x0124]
    assert failed["00081155"]["Value"] == [str(annotated.SOPInstanceUID)]
    assert "burned-in annotation" in response.headers["Warning"]
    [stored] = document["00081199"]["Value"]
    assert server.index.find_instance(stored["00081155"]["Value"][0]) is not None


def _bytes(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_stow_reports_non_dicom_parts_as_failed(server: DicomwebServer, tmp_path: Path) -> None:
    [good] = _new_study(tmp_path, seed=22, count=1)
    body = _multipart([("application/dicom", good.read_bytes()),
                       ("application/dicom", b"not a dicom file at all"),
                       ("text/plain", b"hello")])
    response = httpx.post(f"{server.url}/studies", content=body, headers=_stow_headers())
    assert response.status_code == 202
    document = response.json()
    assert len(document["00081199"]["Value"]) == 1
    reasons = [item["00081197"]["Value"][0] for item in document["00081198"]["Value"]]
    assert reasons == [0xC000, 0xC000]


def test_stow_into_another_study_is_refused(server: DicomwebServer, tmp_path: Path) -> None:
    [instance] = _new_study(tmp_path, seed=23, count=1)
    response = httpx.post(f"{server.url}/studies/1.2.3.4", content=_multipart(
        [("application/dicom", instance.read_bytes())]), headers=_stow_headers())
    assert response.status_code == 409
    [failed] = response.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xA900]


@pytest.mark.parametrize(("headers", "body", "status"), [
    ({"Content-Type": "application/json"}, b"{}", 415),
    ({"Content-Type": 'multipart/related; type="application/dicom"; boundary=other'}, None, 400),
    ({"Content-Type": 'multipart/related; type="application/dicom"'}, None, 400),
    (None, b"x" * (5 * 1024 * 1024), 413),
])
def test_malformed_stow_requests_are_json_4xx(server: DicomwebServer, tmp_path: Path,
                                             headers: dict[str, str] | None, body: bytes | None,
                                             status: int) -> None:
    [instance] = _new_study(tmp_path, seed=24, count=1)
    payload = body if body is not None else _multipart([("application/dicom", instance.read_bytes())])
    if status == 413:
        payload = _multipart([("application/dicom", payload)])
    merged = {**_stow_headers(), **(headers or {})}
    response = httpx.post(f"{server.url}/studies", content=payload, headers=merged)
    assert response.status_code == status
    assert response.json()["error"]["code"]
    assert not list((server.pipeline.spool_root / ".incoming").glob("*.part"))  # nothing left


def test_stow_needs_a_token(server: DicomwebServer) -> None:
    response = httpx.post(f"{server.url}/studies", content=b"", headers={"Content-Type": "x/y"})
    assert response.status_code == 401


def _auth(accept: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", "Accept": accept}


def test_immutable_resources_carry_validators_and_answer_304(server: DicomwebServer) -> None:
    study, series, _ = _uids(server)
    url = f"{server.url}/studies/{study}/series/{series}/metadata"
    first = httpx.get(url, headers=_auth("application/dicom+json"))
    assert first.status_code == 200 and first.headers["etag"] and first.headers["last-modified"]
    again = httpx.get(url, headers={**_auth("application/dicom+json"),
                                    "If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    retrieve = httpx.get(f"{server.url}/studies/{study}", headers={
        **_auth('multipart/related; type="application/dicom"; transfer-syntax=*'),
        "If-None-Match": first.headers["etag"]})
    assert retrieve.status_code == 200  # another representation, another validator
    assert retrieve.headers["etag"] != first.headers["etag"]


def test_json_is_gzipped_when_accepted(server: DicomwebServer) -> None:
    study, _, _ = _uids(server)
    response = httpx.get(f"{server.url}/studies/{study}/metadata",
                         headers={**_auth("application/dicom+json"), "Accept-Encoding": "gzip"})
    assert response.headers["content-encoding"] == "gzip"
    assert len(response.json()) == 6  # httpx decompresses: the body is valid gzip of the JSON


def test_cors_preflight_allows_the_configured_viewer_only(server: DicomwebServer) -> None:
    preflight = {"Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{server.url}/studies", headers={"Origin": "https://viewer.example", **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://viewer.example"
    refused = httpx.options(f"{server.url}/studies", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in refused.headers


def test_bulk_data_uris_of_the_metadata_resolve(client: DICOMwebClient, server: DicomwebServer) -> None:
    study, series, sop = _uids(server)
    metadata = client.retrieve_instance_metadata(study, series, sop)
    uri = metadata["7FE00010"]["BulkDataURI"]
    response = httpx.get(uri, headers=_auth("multipart/related; type=application/octet-stream"))
    assert response.status_code == 200
    assert "multipart/related" in response.headers["content-type"]
    assert len(response.content) > 128 * 128 * 2  # the one frame, plus multipart framing


def test_ohif_viewer_requests_replayed(server: DicomwebServer) -> None:
    """The requests OHIF v3's DICOMweb data source makes for a study list and a viewport."""
    study, series, sop = _uids(server)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    listing = httpx.get(f"{server.url}/studies?limit=101&offset=0&fuzzymatching=false"
                        "&includefield=00081030%2C00080060", headers={**headers, "Accept": "application/dicom+json"})
    assert listing.status_code == 200 and study in listing.text
    assert "00081030" in listing.json()[0]  # StudyDescription present (empty when de-identified)
    series_list = httpx.get(f"{server.url}/studies/{study}/series?includefield=0008103E%2C00080021",
                            headers={**headers, "Accept": "application/dicom+json"})
    assert series_list.status_code == 200 and len(series_list.json()) == 2
    metadata = httpx.get(f"{server.url}/studies/{study}/series/{series}/metadata",
                         headers={**headers, "Accept": "application/dicom+json"})
    assert metadata.status_code == 200 and len(metadata.json()) == 4
    frame = httpx.get(f"{server.url}/studies/{study}/series/{series}/instances/{sop}/frames/1",
                      headers={**headers,
                               "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"})
    assert frame.status_code == 200
    content_type = frame.headers["content-type"]
    assert content_type.startswith("multipart/related") and "boundary=" in content_type
    thumbnail = httpx.get(f"{server.url}/studies/{study}/series/{series}/thumbnail",
                          headers={**headers, "Accept": "image/jpeg"})
    assert thumbnail.status_code == 200 and thumbnail.content[:2] == b"\xff\xd8"


def test_series_metadata_comes_from_metadata_json_once_the_study_is_complete(
    client: DICOMwebClient, server: DicomwebServer,
) -> None:
    from worker import StudyCompletion

    study, series, _ = _uids(server)
    before = client.retrieve_series_metadata(study, series)
    StudyCompletion(server.store, server.index, "site1").run(quiet_seconds=0)
    key = f"studies/{study}/series/{series}/metadata.json"
    assert server.store.head(key).size > 0
    assert client.retrieve_series_metadata(study, series) == before


def test_instance_metadata_read_from_the_instance_when_its_json_is_missing(
    server: DicomwebServer,
) -> None:
    """Without its stored DICOM JSON, an instance's metadata is formatted from the stored
    instance by the formatter ingest used (imaging.dicom_model.instance_document): the same
    document (pixel data aside: the header is read without it), nothing inline."""
    from storage import ObjectNotFound
    from storage.keys import instance_metadata_key, series_metadata_key

    study, series, sop = _uids(server)
    url = f"{server.url}/studies/{study}/series/{series}/instances/{sop}/metadata"
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/dicom+json"}
    [stored] = httpx.get(url, headers=headers).json()
    kept = {}
    for key in (instance_metadata_key(study, series, sop), series_metadata_key(study, series)):
        try:
            kept[key] = server.store.get(key)
        except ObjectNotFound:  # the series' is written when its study is complete
            continue
        server.store.delete(key)
    try:
        [formatted] = httpx.get(url, headers=headers).json()
    finally:
        for key, body in kept.items():
            server.store.put(key, body, content_type="application/json")
    stored.pop("7FE00010")
    assert formatted == stored
    assert not any("InlineBinary" in element for element in formatted.values())


def test_includefield_adds_attributes_from_the_stored_instances(server: DicomwebServer) -> None:
    study, series, sop = _uids(server)
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/dicom+json"}
    [instance] = httpx.get(f"{server.url}/studies/{study}/series/{series}/instances"
                           f"?SOPInstanceUID={sop}&includefield=SliceThickness", headers=headers).json()
    assert instance["00180050"]["Value"] == [1.5]
    [everything] = httpx.get(f"{server.url}/studies/{study}/series/{series}/instances"
                             f"?SOPInstanceUID={sop}&includefield=all", headers=headers).json()
    assert "00280010" in everything and "7FE00010" not in everything
    assert "00180050" not in httpx.get(f"{server.url}/studies/{study}/series/{series}/instances"
                                       f"?SOPInstanceUID={sop}", headers=headers).json()[0]
    studies = httpx.get(f"{server.url}/studies?StudyInstanceUID={study}&includefield=00120062",
                        headers=headers).json()
    assert studies[0]["00120062"]["Value"] == ["YES"]  # PatientIdentityRemoved
    series_all = httpx.get(f"{server.url}/studies/{study}/series?includefield=all", headers=headers).json()
    assert all("00120062" in s for s in series_all)


def test_native_dicom_model_xml_when_asked(server: DicomwebServer) -> None:
    import xml.etree.ElementTree as ET

    study, series, sop = _uids(server)
    accept = 'multipart/related; type="application/dicom+xml"'
    response = httpx.get(f"{server.url}/studies/{study}/series/{series}/instances/{sop}/metadata",
                         headers={"Authorization": f"Bearer {TOKEN}", "Accept": accept})
    assert response.status_code == 200
    content_type = response.headers["content-type"]
    assert content_type.startswith('multipart/related; type="application/dicom+xml"')
    boundary = content_type.split("boundary=")[1].split(";")[0]
    parts = [p for p in response.content.split(f"--{boundary}".encode()) if b"<?xml" in p]
    assert len(parts) == 1
    root = ET.fromstring(parts[0][parts[0].index(b"<?xml"):].rstrip(b"\r\n-"))
    ns = {"d": "http://dicom.nema.org/PS3.19/models/NativeDICOM"}
    sop_value = root.find("d:DicomAttribute[@tag='00080018']/d:Value", ns)
    assert sop_value is not None and sop_value.text == sop
    family = root.find("d:DicomAttribute[@tag='00100010']/d:PersonName/d:Alphabetic/d:FamilyName", ns)
    assert family is not None and family.text == "ANONYMOUS"
    assert root.find("d:DicomAttribute[@tag='7FE00010']/d:BulkData", ns) is not None
    studies = httpx.get(f"{server.url}/studies", headers={"Authorization": f"Bearer {TOKEN}",
                                                          "Accept": accept})
    assert studies.status_code == 200 and studies.content.count(b"<NativeDicomModel") >= 1


def test_stow_of_dicom_json_with_bulk_data(server: DicomwebServer, tmp_path: Path) -> None:
    [path] = _new_study(tmp_path, seed=25, count=1)
    original = pydicom.dcmread(path)
    document = original.to_json_dict(bulk_data_threshold=1024,
                                      bulk_data_element_handler=lambda e: f"bulk/{int(e.tag):08X}")
    response = _json_stow(server, document, [("application/octet-stream", original.PixelData)])
    assert response.status_code == 202, response.text  # stored de-identified (B000)
    stored_uid = server.pipeline.policy.keys.uid(str(original.SOPInstanceUID))
    assert response.json()["00081199"]["Value"][0]["00081155"]["Value"] == [stored_uid]
    key = server.index.find_instance(server.pipeline.policy.keys.uid(str(original.SOPInstanceUID)))
    assert key is not None
    stored = pydicom.dcmread(server.store.root / key[0])
    assert np.array_equal(stored.pixel_array, original.pixel_array)


def test_stow_of_dicom_json_with_a_missing_bulk_part_fails_that_instance(
    server: DicomwebServer, tmp_path: Path,
) -> None:
    [path] = _new_study(tmp_path, seed=26, count=1)
    document = pydicom.dcmread(path).to_json_dict(
        bulk_data_threshold=1024, bulk_data_element_handler=lambda e: "bulk/missing")
    boundary = "stow-json-boundary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom+json\r\n\r\n".encode()
            + json.dumps([document]).encode() + b"\r\n" + f"--{boundary}--\r\n".encode())
    headers = {**_stow_headers(boundary),
               "Content-Type": f'multipart/related; type="application/dicom+json"; boundary={boundary}'}
    response = httpx.post(f"{server.url}/studies", content=body, headers=headers)
    assert response.status_code == 409
    assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]


def _json_stow(server: DicomwebServer, document: dict[str, object],
               bulk_parts: list[tuple[str, bytes]]) -> httpx.Response:
    boundary = "stow-json-boundary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom+json\r\n\r\n".encode()
            + json.dumps([document]).encode() + b"\r\n")
    for content_type, payload in bulk_parts:
        body += (f"--{boundary}\r\nContent-Type: {content_type}\r\n"
                 f"Content-Location: bulk/7FE00010\r\n\r\n".encode() + payload + b"\r\n")
    body += f"--{boundary}--\r\n".encode()
    headers = {**_stow_headers(boundary),
               "Content-Type": f'multipart/related; type="application/dicom+json"; boundary={boundary}'}
    return httpx.post(f"{server.url}/studies", content=body, headers=headers)


@pytest.mark.parametrize(("name", "media_type"), [
    ("MR_small_jpeg_ls_lossless.dcm", "image/jls"),
    ("emri_small_jpeg_2k_lossless.dcm", "image/jp2"),
    ("emri_small_RLE.dcm", "image/dicom-rle"),
])
def test_stow_of_dicom_json_with_compressed_frames(server: DicomwebServer, name: str,
                                                   media_type: str) -> None:
    """Compressed Pixel Data as one part per frame (PS3.18 compressed bulk data): stored in
    that syntax, and the pixels are the original's."""
    from pydicom.data import get_testdata_file
    from pydicom.encaps import generate_frames

    original = pydicom.dcmread(get_testdata_file(name))
    frames = list(generate_frames(original.PixelData,
                                  number_of_frames=int(original.get("NumberOfFrames", 1) or 1)))
    document = original.to_json_dict(bulk_data_threshold=1024,
                                      bulk_data_element_handler=lambda e: f"bulk/{int(e.tag):08X}")
    syntax = original.file_meta.TransferSyntaxUID
    response = _json_stow(server, document,
                          [(f"{media_type}; transfer-syntax={syntax}", f) for f in frames])
    assert response.status_code == 202, response.text  # stored de-identified (B000)
    key = server.index.find_instance(server.pipeline.policy.keys.uid(str(original.SOPInstanceUID)))
    assert key is not None
    stored = pydicom.dcmread(server.store.root / key[0])
    assert np.array_equal(stored.pixel_array, original.pixel_array)


def test_stow_of_dicom_json_with_undecodable_or_miscounted_frames_fails(server: DicomwebServer) -> None:
    from pydicom.data import get_testdata_file

    original = pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    document = original.to_json_dict(bulk_data_threshold=1024,
                                      bulk_data_element_handler=lambda e: f"bulk/{int(e.tag):08X}")
    garbage = _json_stow(server, document, [("image/jls", b"\xff\xd8 not a JPEG-LS stream" * 10)])
    assert garbage.status_code == 409
    assert garbage.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    from pydicom.encaps import generate_frames

    frame = next(generate_frames(original.PixelData, number_of_frames=1))
    twice = _json_stow(server, document, [("image/jls", frame), ("image/jls", frame)])
    assert twice.status_code == 409


def test_negotiated_representations_vary_on_accept(server: DicomwebServer) -> None:
    """A browser cache must not serve a PNG to a JPEG request, or XML to a JSON one."""
    study, series, sop = _uids(server)
    base = f"{server.url}/studies/{study}/series/{series}/instances/{sop}"
    png = httpx.get(f"{base}/rendered", headers=_auth("image/png"))
    jpeg = httpx.get(f"{base}/rendered", headers=_auth("image/jpeg"))
    assert png.headers["content-type"] == "image/png" and jpeg.headers["content-type"] == "image/jpeg"
    assert "Accept" in png.headers["vary"] and "Accept" in jpeg.headers["vary"]
    frames = httpx.get(f"{base}/frames/1", headers=_auth('multipart/related; type="application/octet-stream"'))
    assert "Accept" in frames.headers["vary"]
    search = httpx.get(f"{server.url}/studies", headers=_auth("application/dicom+json"))
    assert "Accept" in search.headers["vary"]


def test_transcoded_retrieve_keeps_the_sop_instance_uid(client: DICOMwebClient,
                                                        server: DicomwebServer) -> None:
    """Decompressing to Explicit VR Little Endian is lossless: the same instance, same UID."""
    study, series, sop = _uids(server)
    instance = client.retrieve_instance(study, series, sop,
                                        media_types=(("application/dicom", "1.2.840.10008.1.2.1"),))
    assert instance.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert instance.SOPInstanceUID == sop and instance.file_meta.MediaStorageSOPInstanceUID == sop


def test_a_large_study_streams_in_bounded_memory(server: DicomwebServer, tmp_path: Path) -> None:
    """160 instances of 1.6 MB (a 256 MB study) go out with the server's (and this
    client's) Python allocations staying under 16 MB: no study is held in memory."""
    import dataclasses
    import os
    import tracemalloc

    from storage import InstanceRecord

    [source] = write_sample_study(tmp_path / "big", SampleStudySpec(
        ct_slices=1, mr_slices=0, ct_size=900, seed=77))
    template = pydicom.dcmread(source)
    study_uid, series_uid = "2.25.8001", "2.25.8001.1"
    first = InstanceRecord.from_dataset(
        template, object_key="big/0.dcm", size_bytes=source.stat().st_size, sha256="0" * 64,
        transfer_syntax_uid=str(template.file_meta.TransferSyntaxUID), site_id="site1")
    records = []
    (server.store.root / "big").mkdir()
    for number in range(160):
        key = f"big/{number}.dcm"
        os.link(source, server.store.root / key)  # same bytes, no 256 MB of writes
        records.append(dataclasses.replace(
            first, study={**first.study, "study_instance_uid": study_uid},
            series={**first.series, "study_instance_uid": study_uid, "series_instance_uid": series_uid},
            instance={**first.instance, "study_instance_uid": study_uid, "series_instance_uid": series_uid,
                      "sop_instance_uid": f"{series_uid}.{number}", "instance_number": number,
                      "object_key": key}))
    server.index.upsert_instances(records)
    expected = 160 * source.stat().st_size
    tracemalloc.start()
    try:
        with httpx.stream("GET", f"{server.url}/studies/{study_uid}", timeout=120,
                          headers={"Authorization": f"Bearer {TOKEN}",
                                   "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}) as response:
            assert response.status_code == 200
            total = sum(len(chunk) for chunk in response.iter_raw(1 << 16))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert expected < total < expected + 160 * 1024  # every body plus part headers
    assert peak < 16 << 20, f"peak {peak / 1e6:.0f} MB while streaming {total / 1e6:.0f} MB"


def _two_instance_series(server: DicomwebServer, tmp_path: Path, folder: str,
                         seed: int, count: int = 2) -> tuple[str, str]:
    """A series of `count` (two) indexed instances whose objects are `<folder>/0.dcm`
    (written) and `<folder>/1.dcm`... (left to the test); (study UID, series UID)."""
    import dataclasses
    import shutil

    from storage import InstanceRecord

    [source] = write_sample_study(tmp_path / folder, SampleStudySpec(ct_slices=1, mr_slices=0, seed=seed))
    template = pydicom.dcmread(source)
    first = InstanceRecord.from_dataset(
        template, object_key=f"{folder}/0.dcm", size_bytes=source.stat().st_size, sha256="0" * 64,
        transfer_syntax_uid=str(template.file_meta.TransferSyntaxUID), site_id="site1")
    (server.store.root / folder).mkdir()
    shutil.copy(source, server.store.root / folder / "0.dcm")
    server.index.upsert_instances([dataclasses.replace(first, instance={
        **first.instance, "sop_instance_uid": f"{first.instance['sop_instance_uid']}.{n}",
        "object_key": f"{folder}/{n}.dcm"}) for n in range(count)])
    return first.instance["study_instance_uid"], first.instance["series_instance_uid"]


def test_retrieve_skips_objects_gone_from_the_store_and_404s_when_none_is_left(
        server: DicomwebServer, tmp_path: Path) -> None:
    """Indexed instances whose objects vanished (a restore in progress, a disk lost): the
    others are sent, as DICOM or rendered; with none left the answer is a 404 JSON, not an
    empty 200 or a 500."""
    study, series = _two_instance_series(server, tmp_path, "gone", 78)  # gone/1.dcm: never
    headers = {"Authorization": f"Bearer {TOKEN}",
               "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    rendered = {"Authorization": f"Bearer {TOKEN}", "Accept": 'multipart/related; type="image/png"'}
    for resource, accept in (("", headers), ("/rendered", rendered)):
        response = httpx.get(f"{server.url}/studies/{study}/series/{series}{resource}", headers=accept)
        assert response.status_code == 200
        assert len(_parts(response)) == 1
    (server.store.root / "gone" / "0.dcm").unlink()
    for resource, accept in (("", headers), ("/rendered", rendered)):
        response = httpx.get(f"{server.url}/studies/{study}/series/{series}{resource}", headers=accept)
        assert response.status_code == 404
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["error"]["code"] == "not_found"


def test_objects_already_in_the_asked_syntax_go_out_as_stored_without_being_parsed(
        server: DicomwebServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default Accept (Explicit VR Little Endian) on objects stored in it: each part is
    the stored file, byte for byte, and no object is parsed to learn its syntax again (the
    index has it)."""
    import shutil

    study, series = _two_instance_series(server, tmp_path, "plain", 80)
    stored = (server.store.root / "plain" / "0.dcm").read_bytes()
    assert pydicom.dcmread(io.BytesIO(stored)).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    shutil.copy(server.store.root / "plain" / "0.dcm", server.store.root / "plain" / "1.dcm")

    def no_parse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a stored object was parsed")

    monkeypatch.setattr(pydicom, "dcmread", no_parse)
    response = httpx.get(f"{server.url}/studies/{study}/series/{series}", headers={
        "Authorization": f"Bearer {TOKEN}", "Accept": 'multipart/related; type="application/dicom"'})
    assert response.status_code == 200
    parts = _parts(response)
    assert [body for _headers, body in parts] == [stored, stored]
    assert [headers["Content-Type"].replace('"', "") for headers, _body in parts] == [
        "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"] * 2


def _copies_series(server: DicomwebServer, tmp_path: Path, folder: str, seed: int,
                   count: int) -> tuple[str, str, bytes]:
    """A series of `count` instances whose objects are all copies of one 512x512 CT file:
    (study UID, series UID, the stored bytes of each). Not 6: that is the sample study."""
    import shutil

    study, series = _two_instance_series(server, tmp_path, folder, seed, count)
    for number in range(1, count):
        shutil.copy(server.store.root / folder / "0.dcm", server.store.root / folder / f"{number}.dcm")
    return study, series, (server.store.root / folder / "0.dcm").read_bytes()


def test_cached_objects_are_read_on_the_event_loop_and_evicted_ones_in_a_thread_alike(
        server: DicomwebServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Objects in the page cache are taken without a blocking read (only the first part,
    read before the answer starts, is); objects evicted from the cache are read the
    blocking way, in a worker thread. The answer is the same, byte for byte."""
    import os


    if not page_cache_reads_work(server.store.root):
        pytest.skip("this file system refuses RWF_NOWAIT reads (tmpfs?)")
    study, series, stored = _copies_series(server, tmp_path, "cache", 81, 5)
    blocking_reads: list[str] = []
    original = OpenedObject.read

    def counted(self: OpenedObject) -> bytes:
        blocking_reads.append(self.key)
        return original(self)

    monkeypatch.setattr(OpenedObject, "read", counted)
    headers = {"Authorization": f"Bearer {TOKEN}",
               "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    url = f"{server.url}/studies/{study}/series/{series}"
    cached = httpx.get(url, headers=headers)
    assert cached.status_code == 200
    assert [body for _headers, body in _parts(cached)] == [stored] * 5
    assert blocking_reads == ["cache/0.dcm"]
    blocking_reads.clear()
    for number in range(5):
        with open(server.store.root / "cache" / f"{number}.dcm", "rb") as handle:
            os.fsync(handle.fileno())  # dirty pages (a fresh copy) are not dropped
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    evicted = httpx.get(url, headers=headers)
    assert evicted.status_code == 200
    assert _parts(evicted) == _parts(cached)
    assert sorted(blocking_reads) == sorted(f"cache/{number}.dcm" for number in range(5))


def _opened_parts(store: FilesystemObjectStore, count: int, size: int,
                  opened: list[OpenedObject]) -> Iterator[StreamedPart]:
    """`count` random objects of `size` bytes, stored, then opened as parts (each kept in
    `opened`, so none is closed by the garbage collector)."""
    import os

    for number in range(count):
        store.put(f"objects/{number}.dcm", os.urandom(size))
    for number in range(count):
        body = open_stored(store, f"objects/{number}.dcm", size)
        assert body is not None
        opened.append(body)
        yield ("application/dicom", body, {})


def test_an_answer_abandoned_mid_stream_closes_the_objects_opened_ahead(tmp_path: Path) -> None:
    """The client hangs up after the first piece: every object opened ahead for it is
    closed there and then, not when garbage is collected (the test keeps them all)."""
    import anyio

    from web_viewer_api.loop_reads import OPEN_AHEAD, multipart_body

    store = FilesystemObjectStore(tmp_path / "store")
    opened: list[OpenedObject] = []

    async def first_piece() -> bytes | memoryview:
        body = multipart_body(_opened_parts(store, OPEN_AHEAD + 4, 1000, opened), "b")
        try:
            return await body.__anext__()
        finally:
            await body.aclose()

    assert bytes(anyio.run(first_piece)).startswith(b"--b\r\nContent-Type: application/dicom")
    assert len(opened) == OPEN_AHEAD  # one batch was opened ahead, and only that
    for body in opened:
        with pytest.raises(StorageError, match="after close"):
            body.read()


def test_reading_cached_objects_on_the_event_loop_lets_other_tasks_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight cached objects of 1 MB, all read on the loop: nothing in sending them waits,
    yet other tasks on the loop run between them (the loop never reads more than about
    1 MB in one go)."""
    import anyio
    import anyio.lowlevel

    from web_viewer_api.loop_reads import multipart_body

    def no_thread_read(self: OpenedObject) -> bytes:
        raise AssertionError(f"{self.key} read in a thread, not from the page cache")

    monkeypatch.setattr(OpenedObject, "read", no_thread_read)

    store = FilesystemObjectStore(tmp_path / "store")
    if not page_cache_reads_work(tmp_path):
        pytest.skip("this file system refuses RWF_NOWAIT reads (tmpfs?)")
    opened: list[OpenedObject] = []
    ticks_at_object: list[int] = []

    async def run() -> None:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as group:
            group.start_soon(ticker)
            async for piece in multipart_body(_opened_parts(store, 8, 1 << 20, opened), "b"):
                if len(piece) == 1 << 20:
                    ticks_at_object.append(ticks)
            group.cancel_scope.cancel()

    anyio.run(run)
    assert len(ticks_at_object) == 8
    assert len(set(ticks_at_object)) > 4  # the ticker ran between the objects


def test_an_object_stored_again_since_indexing_is_parsed_not_trusted(
        server: DicomwebServer, tmp_path: Path) -> None:
    """The index says Explicit VR Little Endian, but the object was stored again since in
    JPEG-LS (a new ingest whose index update is still to come): its size differs from the
    indexed one, so it is parsed, and the client asking for Explicit VR Little Endian gets
    that, not JPEG-LS bytes under the wrong label."""
    from imaging import Codec, encode_dataset, transcode_lossless

    study, series = _two_instance_series(server, tmp_path, "stale", 83, count=1)
    path = server.store.root / "stale" / "0.dcm"
    original = pydicom.dcmread(path)
    compressed = pydicom.dcmread(path)
    transcode_lossless(compressed, Codec.JPEG_LS)
    path.write_bytes(encode_dataset(compressed))
    assert compressed.file_meta.TransferSyntaxUID != "1.2.840.10008.1.2.1"
    response = httpx.get(f"{server.url}/studies/{study}/series/{series}", headers={
        "Authorization": f"Bearer {TOKEN}", "Accept": 'multipart/related; type="application/dicom"'})
    assert response.status_code == 200
    [(_headers, body)] = _parts(response)
    served = pydicom.dcmread(io.BytesIO(body))
    assert served.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert np.array_equal(served.pixel_array, original.pixel_array)


def test_a_client_gone_mid_retrieval_leaves_no_object_open(server: DicomwebServer, tmp_path: Path) -> None:
    """A client that stops reading a 21 MB answer and hangs up (the server learns it while
    sending): the objects opened ahead for it are all closed."""
    import socket

    study, series, _stored = _copies_series(server, tmp_path, "hangup", 82, 40)
    headers = {"Authorization": f"Bearer {TOKEN}",
               "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    url = f"{server.url}/studies/{study}/series/{series}"
    assert httpx.get(url, headers=headers).status_code == 200
    folder = server.store.root / "hangup"
    assert opened_under(folder) == 0
    # A small receive buffer: the kernel would otherwise take in the whole answer (its
    # receive buffers grow to 32 MB here) and the server would have nothing left to send.
    small_buffer = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)])
    with httpx.Client(transport=small_buffer) as client, client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200
        chunks = response.iter_raw(65536)  # kept: a dropped iterator hangs up at once
        next(chunks)
        wait_for(lambda: opened_under(folder) > 0, timeout=10, what="objects opened ahead")
    wait_for(lambda: opened_under(folder) == 0, timeout=10, what="the opened objects closed")


def test_an_object_failing_in_a_thread_read_cuts_the_answer_and_leaves_none_open(
        server: DicomwebServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Objects the page cache lacks are read in a worker thread; one failing there (a disk
    error) cuts the answer, never a complete-looking one, and the objects opened ahead of
    it are closed."""
    import os


    study, series, _stored = _copies_series(server, tmp_path, "coldfail", 84, 5)
    for number in range(5):
        with open(server.store.root / "coldfail" / f"{number}.dcm", "rb") as handle:
            os.fsync(handle.fileno())
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    original = OpenedObject.read

    def failing(self: OpenedObject) -> bytes:
        if self.key == "coldfail/2.dcm":
            raise StorageError("cannot read object: Input/output error")
        return original(self)

    monkeypatch.setattr(OpenedObject, "read", failing)
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"{server.url}/studies/{study}/series/{series}", headers={
            "Authorization": f"Bearer {TOKEN}",
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    wait_for(lambda: opened_under(server.store.root / "coldfail") == 0, timeout=10,
             what="the opened objects closed")


def test_past_its_cap_of_opened_objects_the_store_is_read_instead(
        server: DicomwebServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One opened object allowed: the parts after it are read bytes, and the answer is the
    same."""
    from web_viewer_api.dicomweb.wado import Wado

    monkeypatch.setattr(loop_reads, "_DESCRIPTORS", loop_reads._Descriptors(1))
    study, series, stored = _copies_series(server, tmp_path, "capped", 85, 3)
    wado = Wado(server.index, FilesystemObjectStore(server.store.root))
    parts = list(wado.instance_parts(wado.instances(study, series), "*"))
    bodies = [body for _type, body, _headers in parts]
    assert not isinstance(bodies[0], bytes) and bodies[1:] == [stored, stored]
    assert bodies[0].read() == stored
    bodies[0].close()


def test_a_store_failing_mid_stream_cuts_the_answer_and_is_audited_as_a_failure(
        server: DicomwebServer, tmp_path: Path) -> None:
    """The first object reads, the second fails with an I/O error once the 200 has gone
    out: the client sees a cut-off body (never a complete-looking one) and the audit trail
    records a server failure, not the 200 that started."""
    import os

    study, series = _two_instance_series(server, tmp_path, "eio", 79)
    os.symlink("/proc/self/mem", server.store.root / "eio" / "1.dcm")  # reading it: EIO
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"{server.url}/studies/{study}/series/{series}", headers={
            "Authorization": f"Bearer {TOKEN}",
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})

    def audited() -> dict[str, object] | None:
        page = httpx.get(f"{server.root}/api/audit", headers={"Authorization": f"Bearer {TOKEN}"},
                         params={"action": "dicomweb.retrieve", "study_uid": study})
        events = page.json()["events"]
        return events[0] if events else None

    event = wait_for(audited, timeout=10, what="the retrieval's audit event")
    assert event["event_outcome_indicator"] == 8


def _parts(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related answer, parsed by the standard library."""
    import email.parser
    import email.policy

    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {response.headers['content-type']}\r\n\r\n".encode() + response.content)
    assert message.is_multipart()
    return [(dict(part.items()), part.get_payload(decode=True)) for part in message.iter_parts()]


def test_rendered_series_and_study_are_multipart_images(server: DicomwebServer) -> None:
    from PIL import Image

    study, series, _ = _uids(server)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    png = httpx.get(f"{server.url}/studies/{study}/series/{series}/rendered",
                    headers={**auth, "Accept": 'multipart/related; type="image/png"'})
    assert png.status_code == 200 and 'type="image/png"' in png.headers["content-type"]
    parts = _parts(png)
    assert len(parts) == 4  # the CT series' four images
    assert all(body.startswith(b"\x89PNG") and "/rendered" in headers["Content-Location"]
               for headers, body in parts)
    assert len({headers["Content-Location"] for headers, _ in parts}) == 4
    jpeg = httpx.get(f"{server.url}/studies/{study}/rendered", params={"viewport": "32,32", "quality": "80"},
                     headers={**auth, "Accept": 'multipart/related; type="image/jpeg"'})
    images = [Image.open(io.BytesIO(body)) for _, body in _parts(jpeg)]
    assert len(images) == 6 and all(i.format == "JPEG" and max(i.size) == 32 for i in images)
    refused = httpx.get(f"{server.url}/studies/{study}/rendered",
                        headers={**auth, "Accept": 'multipart/related; type="application/dicom"'})
    assert refused.status_code == 406 and refused.json()["error"]
    bad = httpx.get(f"{server.url}/studies/{study}/rendered", params={"window": "wide"}, headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]


def test_searches_answer_alike_on_the_event_loop_and_in_a_worker_thread(server: DicomwebServer) -> None:
    study, series, sop = _uids(server)
    patient = next(s for s in server.index.search_studies(StudyQuery())
                   if s.study_instance_uid == study).patient_id
    paths = ["/studies", f"/studies?PatientID={patient}", "/studies?StudyDate=19000101-&limit=1",
             "/studies?PatientName=*&ModalitiesInStudy=MR", f"/studies/{study}/series",
             "/series?Modality=CT", f"/studies/{study}/series/{series}/instances",
             f"/instances?SOPInstanceUID={sop}", f"/studies/{study}/instances?limit=2&offset=1"]
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/dicom+json"}
    kept = server.app.state.inline_reads
    answers = {}
    try:
        for budget in (10.0, 0.0):  # every search on the event loop, then none
            server.app.state.inline_reads = reads = InlineReads(server.index.engine, budget)
            try:
                answers[budget] = [httpx.get(server.url + path, headers=headers) for path in paths]
                assert reads.answered == (len(paths) if budget else 0)
            finally:
                reads.close()
    finally:
        server.app.state.inline_reads = kept
    for inline, threaded in zip(answers[10.0], answers[0.0], strict=True):
        assert inline.status_code == threaded.status_code == 200, inline.text
        assert inline.json() == threaded.json() and inline.json()
        assert inline.headers.get("warning") == threaded.headers.get("warning")
    assert "There are additional results" in answers[10.0][2].headers["warning"]


def test_searches_that_read_objects_or_list_much_go_to_a_worker_thread(server: DicomwebServer) -> None:
    study, _series, _sop = _uids(server)
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/dicom+json"}
    kept = server.app.state.inline_reads
    server.app.state.inline_reads = reads = InlineReads(server.index.engine, 10.0)
    try:
        for path in (f"/studies?StudyInstanceUID={study}&includefield=all", "/studies?limit=101",
                     f"/studies/{study}/series?includefield=00080021",
                     f"/studies/{study}/instances?limit=1000"):
            assert httpx.get(server.url + path, headers=headers).status_code == 200
        xml = httpx.get(f"{server.url}/studies/{study}/series", headers={
            **headers, "Accept": 'multipart/related; type="application/dicom+xml"'})
        assert xml.status_code == 200 and b"<NativeDicomModel" in xml.content
        assert (reads.answered, reads.handed_back) == (0, 0)
        assert httpx.get(f"{server.url}/studies?limit=100", headers=headers).status_code == 200
        assert reads.answered == 1
    finally:
        server.app.state.inline_reads = kept
        reads.close()


def test_a_locked_index_holds_searches_back_but_never_the_server(server: DicomwebServer) -> None:
    """A search the index cannot answer at once waits in a worker thread: the event loop
    goes on serving (here /livez) and the search completes once the lock is gone."""
    study, _series, _sop = _uids(server)
    kept = server.app.state.inline_reads
    kept.close()  # its connections would keep the exclusive lock from being taken
    server.app.state.inline_reads = reads = InlineReads(server.index.engine, 0.005)
    locker = sqlite3.connect(str(server.index.engine.url.database), isolation_level=None, timeout=0)
    locker.execute("PRAGMA locking_mode=EXCLUSIVE")

    def locked() -> bool:
        """The exclusive lock, once no other connection has the file open (the audit writer
        may open one at any time: try again until it has closed it)."""
        server.app.state.audit_writer.flush()
        server.index.engine.dispose()
        try:
            locker.execute("BEGIN EXCLUSIVE")
        except sqlite3.OperationalError:
            return False
        return True

    answer: list[httpx.Response] = []
    try:
        wait_for(locked, timeout=30, what="an exclusive lock on the index")
        search = threading.Thread(target=lambda: answer.append(httpx.get(
            f"{server.url}/studies?StudyInstanceUID={study}", timeout=60,
            headers={"Authorization": f"Bearer {TOKEN}"})))
        search.start()
        wait_for(lambda: reads.handed_back == 1, timeout=10, what="the search to leave the event loop")
        started = time.perf_counter()
        assert httpx.get(f"{server.root}/livez", timeout=10).status_code == 200
        assert time.perf_counter() - started < 2
        assert search.is_alive() and not answer  # still waiting for the lock
    finally:
        locker.close()
        reads.close()
        server.app.state.inline_reads = InlineReads(server.index.engine, kept.budget)
    search.join(timeout=60)
    assert answer[0].status_code == 200
    assert [s["0020000D"]["Value"][0] for s in answer[0].json()] == [study]


def test_stow_of_an_altered_copy_of_a_stored_instance_leaves_the_original_byte_identical(
        server: DicomwebServer, tmp_path: Path) -> None:
    """The overwrite attempt by STOW-RS: the same (original) UIDs, other pixels. The worker
    keeps the stored object, quarantines the copy and writes a Security Alert."""
    import hashlib
    import json as json_module

    from anonymize import PseudonymKeys
    from storage import AccessRepository, AuditQuery

    source = min((server.pipeline.spool_root.parent / "source").glob("*.dcm"))
    original = pydicom.dcmread(source)
    archived_uid = PseudonymKeys(b"w" * 32).uid(str(original.SOPInstanceUID))  # the server's key
    [row] = server.index.search_instances(InstanceQuery(sop_instance_uids=(archived_uid,)))
    before = hashlib.sha256(server.store.get(row.object_key)).hexdigest()
    pixels = original.pixel_array.copy()
    pixels[:16, :16] = pixels.max()
    original.PixelData = pixels.tobytes()
    altered = tmp_path / "altered.dcm"
    original.save_as(altered, enforce_file_format=True)
    access = AccessRepository(server.index.engine)
    server.pipeline.audit = access.append_audit
    try:
        response = httpx.post(f"{server.url}/studies", content=_multipart(
            [("application/dicom", altered.read_bytes())]), headers=_stow_headers(), timeout=60)
    finally:
        server.pipeline.audit = None
    # the answer tells the truth: not stored, a duplicate SOP instance (0111), and why
    assert response.status_code == 409, response.text
    [failed] = response.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0x0111]
    assert failed["00081155"]["Value"] == [str(original.SOPInstanceUID)]
    assert "a different instance is stored under these UIDs" in response.headers["Warning"]
    assert hashlib.sha256(server.store.get(row.object_key)).hexdigest() == before
    assert server.index.search_instances(InstanceQuery(sop_instance_uids=(row.sop_instance_uid,))) == [row]
    [alert] = access.search_audit(AuditQuery(actions=("instance.conflict",)))
    assert (alert.event_code, alert.study_instance_uid) == ("110113", row.study_instance_uid)
    assert json_module.loads(alert.detail)["stored_sha256"] == before


def test_stow_without_a_worker_says_what_is_still_being_processed(tmp_path: Path) -> None:
    """The worker does not answer in time (here: none runs): 202, the instances listed as
    sent, without RetrieveURL, and a Warning saying they are durable and still processed;
    once a worker runs, they are stored."""
    with DicomwebServer(tmp_path / "no-worker", worker=False) as lonely:
        [path] = _new_study(tmp_path, seed=28, count=1)
        sent = pydicom.dcmread(path, stop_before_pixels=True)
        response = httpx.post(f"{lonely.url}/studies", content=_multipart(
            [("application/dicom", path.read_bytes())]), headers=_stow_headers(), timeout=60)
        assert response.status_code == 202, response.text
        [item] = response.json()["00081199"]["Value"]
        assert item["00081155"]["Value"] == [str(sent.SOPInstanceUID)]
        assert "00081190" not in item and "00081190" not in response.json()
        assert "not yet processed" in response.headers["Warning"]
        site, batch = lonely.enqueued[-1]
        assert lonely.pipeline.ingest_batch(site, batch).stored == 1
        stored = lonely.pipeline.policy.keys.uid(str(sent.SOPInstanceUID))  # type: ignore[union-attr]
        assert lonely.index.find_instance(stored) is not None
