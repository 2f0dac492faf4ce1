"""Every request's work is bounded by its size (issue 19), against a real uvicorn server:
URL and header lengths (414/431), numeric parameters (400), frame lists, STOW-RS
boundaries, part counts and DICOM JSON depth — each at its limit and one past it, with the
JSON error body, and no upload file left behind."""

from __future__ import annotations

import http.client
import io
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from imaging.dicom_model import json_bytes, native_xml
from tests.support.dicomweb_server import TOKEN, DicomwebServer
from web_viewer_api.dicomweb import stow
from web_viewer_api.dicomweb.qido import MAX_OFFSET
from web_viewer_api.request_limits import RequestLimits

AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = RequestLimits()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomwebServer]:
    with DicomwebServer(Path(tmp_path_factory.mktemp("bounds")), auth_failure_limit=10**9) as running:
        yield running


@pytest.fixture(scope="module")
def instance(server: DicomwebServer) -> str:
    """The path of one stored CT instance (single frame), under /studies."""
    found = httpx.get(f"{server.url}/instances", params={"limit": 1}, headers=AUTH).json()[0]
    study, series, sop = (found[tag]["Value"][0] for tag in ("0020000D", "0020000E", "00080018"))
    return f"/studies/{study}/series/{series}/instances/{sop}"


@pytest.fixture(scope="module")
def share_root(server: DicomwebServer, instance: str) -> str:
    """A share of that study without PIN: its DICOMweb root, readable without credentials."""
    study = instance.split("/")[2]
    created = httpx.post(f"{server.root}/api/shares", headers=AUTH,
                         json={"study_uids": [study], "expires_in": 3600})
    assert created.status_code == 201, created.text
    return f"{server.root}/s/{created.json()['token']}/dicom-web"


def _error(response: httpx.Response | tuple[int, bytes], status: int, code: str | None = None) -> None:
    got, body = ((response.status_code, response.content) if isinstance(response, httpx.Response)
                 else response)
    assert got == status, body[:300]
    error = json.loads(body)["error"]
    assert set(error) == {"code", "message"}
    if code is not None:
        assert error["code"] == code


def _raw_get(server: DicomwebServer, target: str, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
    """GET with exactly these header fields (no Host or Accept-Encoding added)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def _leftovers(server: DicomwebServer) -> list[Path]:
    return sorted((Path(server.store.root).parent / "spool").rglob(".stow-*"))


# URL and headers ---------------------------------------------------------------------------
def _padded_target(prefix: str, size: int) -> str:
    """`prefix` + `?PatientID=...`, the path and query string together `size` bytes."""
    query = "PatientID="
    return f"{prefix}?{query}{'A' * (size - len(prefix) - len(query))}"


@pytest.mark.parametrize("prefix", ["/dicom-web/studies", "/s/some-share-token/dicom-web/studies",
                                    "/s/some-share-token", "/api/shares", "/healthz"])
def test_url_over_the_limit_is_414_on_every_route(server: DicomwebServer, prefix: str) -> None:
    target = _padded_target(prefix, LIMITS.max_url_bytes + 1)
    _error(_raw_get(server, target, [("Host", "127.0.0.1"), *AUTH.items()]), 414, "uri_too_long")
    _error(_raw_get(server, target + "A" * 50_000, [("Host", "127.0.0.1")]), 414, "uri_too_long")
    # Past 64 KiB, uvicorn's parser (httptools) refuses the request line itself, before the
    # application: its plain-text 400, never an answer to the request (docs/development/robustness.md).
    assert _raw_get(server, target + "A" * 120_000, [("Host", "127.0.0.1")])[0] == 400


def test_url_at_the_limit_is_served(server: DicomwebServer) -> None:
    target = _padded_target("/dicom-web/studies", LIMITS.max_url_bytes)
    status, body = _raw_get(server, target, [("Host", "127.0.0.1"), *AUTH.items()])
    assert status == 200, body[:300]
    assert json.loads(body) == []


def _headers_of_total(size: int) -> list[tuple[str, str]]:
    """Host, Authorization and X-Pad fields whose names and values total `size` bytes."""
    fields = [("Host", "127.0.0.1"), *AUTH.items()]
    used = sum(len(n) + len(v) for n, v in fields)
    remaining = size - used
    pads = []
    while remaining > 0:
        value = min(remaining - len("X-Pad"), 4000)
        pads.append(("X-Pad", "p" * value))
        remaining -= len("X-Pad") + value
    return fields + pads


def test_headers_over_the_limit_are_431(server: DicomwebServer) -> None:
    status, body = _raw_get(server, "/dicom-web/studies", _headers_of_total(LIMITS.max_header_bytes))
    assert status == 200, body[:300]
    _error(_raw_get(server, "/dicom-web/studies", _headers_of_total(LIMITS.max_header_bytes + 1)),
           431, "headers_too_large")


def test_one_header_over_its_limit_is_431(server: DicomwebServer) -> None:
    base = [("Host", "127.0.0.1"), *AUTH.items()]
    fits = ("X-Pad", "p" * (LIMITS.max_single_header_bytes - len("x-pad")))
    assert _raw_get(server, "/dicom-web/studies", [*base, fits])[0] == 200
    _error(_raw_get(server, "/dicom-web/studies", [*base, (fits[0], fits[1] + "p")]),
           431, "headers_too_large")
    too_many = [*base, *(("X-Pad", "p") for _ in range(LIMITS.max_header_count))]
    _error(_raw_get(server, "/s/some-share-token", too_many), 431, "headers_too_large")


# Numbers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [str(MAX_OFFSET + 1), str(2**63), str(2**64), "9" * 5000, "-1", "1e3"])
def test_offset_out_of_range_is_400(server: DicomwebServer, share_root: str, offset: str) -> None:
    for root, headers in ((server.url, AUTH), (share_root, {})):
        for level in ("/studies", "/series", "/instances"):
            _error(httpx.get(root + level, params={"offset": offset}, headers=headers), 400)


def test_offset_at_its_limit_is_an_empty_page(server: DicomwebServer, share_root: str) -> None:
    for root, headers in ((server.url, AUTH), (share_root, {})):
        answer = httpx.get(f"{root}/studies", params={"offset": MAX_OFFSET}, headers=headers)
        assert (answer.status_code, answer.json()) == (200, [])


@pytest.mark.parametrize(("name", "good", "bad"), [
    ("quality", ["1", "100"], ["0", "101", "-5", "9" * 40, "high"]),
    ("viewport", ["1,1", "64,64", "64,64,0,0,10,10", "64,64,,,,"],
     ["0,64", "64,65536", "64", "64,64,1", "nan,64", "64,64,inf,0,1,1"]),
    ("window", ["40,400", "40,400,linear", "-1000,1,SIGMOID"],
     ["40,0", "40,-1", "nan,400", "40,inf", "1e17,400", "40,400,cubic", "wide"]),
])
def test_rendering_parameters_are_range_checked(server: DicomwebServer, share_root: str,
                                                instance: str, name: str, good: list[str],
                                                bad: list[str]) -> None:
    for value in good:
        answer = httpx.get(f"{server.url}{instance}/rendered", params={name: value},
                           headers={**AUTH, "Accept": "image/png"})
        assert answer.status_code == 200, (value, answer.text[:200])
    for value in bad:
        for root, headers in ((server.url, AUTH), (share_root, {})):
            _error(httpx.get(f"{root}{instance}/rendered", params={name: value}, headers=headers), 400)


def test_bulkdata_tag_must_be_eight_hex_digits(server: DicomwebServer, instance: str) -> None:
    for tag in ("1" * 40, "-7FE0010", "7FE0001"):
        _error(httpx.get(f"{server.url}{instance}/bulkdata/{tag}", headers=AUTH), 400)


# Frame lists -------------------------------------------------------------------------------
def test_a_frame_listed_twice_is_400_and_an_absent_frame_404(server: DicomwebServer, share_root: str,
                                                            instance: str) -> None:
    one = httpx.get(f"{server.url}{instance}/frames/1", headers={**AUTH, "Accept": "*/*"})
    assert one.status_code == 200
    for root, headers in ((server.url, AUTH), (share_root, {})):
        headers = {**headers, "Accept": "*/*"}
        repeated = ",".join(["1"] * 2000)  # once cost 1 GB to send
        _error(httpx.get(f"{root}{instance}/frames/{repeated}", headers=headers), 400)
        _error(httpx.get(f"{root}{instance}/frames/1,1", headers=headers), 400)
        _error(httpx.get(f"{root}{instance}/frames/2", headers=headers), 404)
        _error(httpx.get(f"{root}{instance}/frames/1,2", headers=headers), 404)
        _error(httpx.get(f"{root}{instance}/frames/{'9' * 5000}", headers=headers), 400)
        again = httpx.get(f"{root}{instance}/frames/1", headers=headers)
        assert (again.status_code, len(again.content)) == (200, len(one.content))


# STOW-RS -----------------------------------------------------------------------------------
def _stow(server: DicomwebServer, boundary: str, parts: list[tuple[str, bytes]],
          kind: str = "application/dicom") -> httpx.Response:
    body = b"".join(f"--{boundary}\r\nContent-Type: {media}\r\n\r\n".encode() + payload + b"\r\n"
                    for media, payload in parts) + f"--{boundary}--\r\n".encode()  # utf-8
    content_type = f'multipart/related; type="{kind}"; boundary="{boundary}"'.encode()
    return httpx.post(f"{server.url}/studies", content=body, timeout=120, headers={
        **AUTH, "Accept": "application/dicom+json", "Content-Type": content_type})


@pytest.mark.parametrize("boundary", ["b" * 71, "b" * 257, "b" * 5000, "ends with a space ", "ü" * 10,
                                      "semi;colon"])
def test_boundary_outside_rfc_2046_is_400(server: DicomwebServer, boundary: str) -> None:
    answer = _stow(server, boundary, [("application/dicom", b"not dicom")])
    _error(answer, 400, "bad_request")
    assert _leftovers(server) == []


@pytest.mark.parametrize("boundary", ["b" * 70, "x", "a'()+_,-./:=? z"])
def test_boundary_within_rfc_2046_is_parsed(server: DicomwebServer, boundary: str) -> None:
    answer = _stow(server, boundary, [("application/dicom", b"not dicom")])
    assert answer.status_code == 409, answer.text[:300]  # parsed: the one part failed
    assert len(answer.json()["00081198"]["Value"]) == 1
    assert _leftovers(server) == []


def test_more_parts_than_allowed_is_413_and_leaves_nothing(server: DicomwebServer) -> None:
    limit = stow.StowTarget.max_parts
    answer = _stow(server, "bound", [("application/dicom", b"x")] * (limit + 1))
    _error(answer, 413, "too_large")
    assert _leftovers(server) == []


def test_part_headers_over_their_limit_are_400(server: DicomwebServer) -> None:
    padded = "application/dicom; x=" + "p" * stow.MAX_PART_HEADER_BYTES
    _error(_stow(server, "bound", [(padded, b"x")]), 400)
    assert _leftovers(server) == []


def _nested_json(depth: int) -> bytes:
    """A DICOM JSON data set whose sequences nest `depth` levels deep (written as text:
    json.dumps itself cannot nest that deep)."""
    head = ('[{"00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.88.11"]}, '
            '"00080018": {"vr": "UI", "Value": ["2.25.1"]}, '
            '"0020000D": {"vr": "UI", "Value": ["2.25.2"]}, ')
    opening = '"0040A730": {"vr": "SQ", "Value": [{'
    leaf = '"00080100": {"vr": "SH", "Value": ["leaf"]}'
    return (head + opening * depth + leaf + "}]}" * depth + "}]").encode()


@pytest.mark.parametrize("depth", [60, 3000])
def test_dicom_json_nested_too_deep_fails_and_leaves_nothing(server: DicomwebServer, depth: int) -> None:
    text = _nested_json(depth)
    if depth < 1000:  # within what the decoder takes: refused by our own depth limit
        assert json.loads(text) is not None
    answer = _stow(server, "bound", [("application/dicom+json", text)], kind="application/dicom+json")
    assert answer.status_code == 409, answer.text[:300]
    assert answer.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert _leftovers(server) == []


def test_json_depth_limit_is_exact(tmp_path: Path) -> None:
    def part(depth: int) -> stow._Part:
        path = tmp_path / f"{depth}.json"
        path.write_text("[" * depth + "]" * depth)
        return stow._Part(path, {}, path.stat().st_size)

    assert stow._load_json_part(part(stow.MAX_JSON_DEPTH)) is not None
    assert stow._load_json_part(part(stow.MAX_JSON_DEPTH + 1)) is None
    assert stow._load_json_part(part(100_000)) is None  # past the decoder's own limit


def test_dicom_json_over_its_size_is_a_failed_instance(tmp_path: Path) -> None:
    path = tmp_path / ".stow-big.part"
    path.write_bytes(b"[]")
    big = stow._Part(path, {"content-type": "application/dicom+json"}, stow.MAX_JSON_PART_BYTES + 1)
    instances, failed = stow.json_parts_to_instances([big], tmp_path)
    assert (instances, failed) == ([], 1)
    assert list(tmp_path.iterdir()) == []


# Writers -----------------------------------------------------------------------------------
def test_xml_answers_are_well_formed_whatever_the_values(server: DicomwebServer) -> None:
    hostile = "A\x00B\x01\x0b\x0c\x1f\ud800\ufffe\uffffZ\t\n"
    document = {"00081030": {"vr": "LO", "Value": [hostile]},
                "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe\x07^Jane\udfff"}]},
                "7FE00010": {"vr": "OW", "BulkDataURI": "http://x/\x1b"}}
    root = ET.fromstring(native_xml(document))  # raises if not well-formed
    values = [element.text for element in root.iter() if element.text]
    assert "A\ufffdB\ufffd\ufffd\ufffd\ufffd\ufffd\ufffd\ufffdZ\t\n" in values
    assert "Doe\ufffd" in values and "Jane\ufffd" in values
    # And over HTTP: a real answer in XML parses part by part.
    answer = httpx.get(f"{server.url}/studies", headers={
        **AUTH, "Accept": 'multipart/related; type="application/dicom+xml"'})
    assert answer.status_code == 200
    assert b"<NativeDicomModel" in answer.content


def test_json_answers_are_valid_utf8_whatever_the_values() -> None:
    body = [{"00081030": {"vr": "LO", "Value": ["A\ud800B\x00\u00e9"]}}]
    encoded = json_bytes(body)
    assert json.loads(encoded.decode("utf-8", errors="strict")) == [
        {"00081030": {"vr": "LO", "Value": ["A\ufffdB\x00\u00e9"]}}]


def test_server_answers_normally_after_the_bounds(server: DicomwebServer, instance: str) -> None:
    assert httpx.get(f"{server.url}/studies", headers=AUTH).status_code == 200
    assert httpx.get(f"{server.url}{instance}/frames/1", headers={**AUTH, "Accept": "*/*"}).status_code == 200
    single = httpx.get(f"{server.url}{instance}", headers={**AUTH, "Accept": "application/dicom"})
    assert single.status_code == 200
    assert str(pydicom.dcmread(io.BytesIO(single.content)).SOPInstanceUID) == instance.rsplit("/", 1)[1]
