"""Hypothesis-driven hostile input to the HTTP API (real server on loopback): QIDO query
strings, STOW-RS multipart bodies and headers, share tokens and PINs. No answer may be a
5xx, every 4xx carries the JSON error body (or an HTML page under /s/), and the server keeps
answering. DGW_FUZZ_EXAMPLES raises the number of cases (default: a few hundred in CI)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.dicomweb_server import TOKEN, DicomwebServer

EXAMPLES = int(os.environ.get("DGW_FUZZ_EXAMPLES", "150"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    derandomize=not os.environ.get("DGW_FUZZ_RANDOM"),
                    suppress_health_check=list(HealthCheck))
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomwebServer]:
    with DicomwebServer(Path(tmp_path_factory.mktemp("fuzz")),
                        auth_failure_limit=10**9) as running:
        yield running


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as shared:
        yield shared


def _check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.request.url, response.text[:300])
    media = response.headers.get("content-type", "").split(";")[0]
    if response.status_code >= 400 and media == "application/json":  # STOW answers DICOM JSON
        assert set(response.json()["error"]) == {"code", "message"}


KEYS = st.sampled_from(["PatientID", "PatientName", "StudyDate", "StudyInstanceUID", "AccessionNumber",
                        "ModalitiesInStudy", "00100020", "limit", "offset", "includefield",
                        "fuzzymatching", "SeriesInstanceUID", "Modality", "SOPInstanceUID",
                        "InstanceNumber", "SeriesNumber", "StudyTime", "x" * 70])
VALUES = st.one_of(st.text(max_size=80), st.from_regex(r"[0-9\-.*?\\]{0,40}", fullmatch=True),
                   st.integers(-10**12, 10**12).map(str))
PATHS = st.sampled_from(["/studies", "/series", "/instances", "/studies/1.2.3/series",
                         "/studies/1.2.3/series/1.2.4/instances"])


@SETTINGS
@given(path=PATHS, query=st.lists(st.tuples(KEYS, VALUES), max_size=6),
       accept=st.sampled_from(["application/dicom+json", "*/*", "text/html",
                               'multipart/related; type="application/dicom+xml"', ""]))
def test_qido_query_strings(server: DicomwebServer, client: httpx.Client, path: str,
                            query: list[tuple[str, str]], accept: str) -> None:
    _check(client.get(server.url + path, params=query, headers={**AUTH, "Accept": accept}))


PART = st.tuples(st.sampled_from(["application/dicom", "application/dicom+json", "text/plain",
                                  "application/octet-stream", ""]),
                 st.binary(max_size=600))


@SETTINGS
@given(parts=st.lists(PART, max_size=4), boundary=st.from_regex(r"[A-Za-z0-9'()+_,\-./:=?]{1,40}", fullmatch=True),
       declared=st.sampled_from(["same", "other", "none"]),
       kind=st.sampled_from(["application/dicom", "application/dicom+json", "text/plain"]),
       truncate=st.integers(0, 40))
def test_stow_multipart_bodies(server: DicomwebServer, client: httpx.Client,
                               parts: list[tuple[str, bytes]], boundary: str, declared: str,
                               kind: str, truncate: int) -> None:
    body = b"".join(f"--{boundary}\r\nContent-Type: {t}\r\n\r\n".encode() + payload + b"\r\n"
                    for t, payload in parts) + f"--{boundary}--\r\n".encode()
    if truncate:
        body = body[:-truncate]
    header_boundary = {"same": f"; boundary={boundary}", "other": "; boundary=zzz", "none": ""}[declared]
    response = client.post(f"{server.url}/studies", content=body, headers={
        **AUTH, "Content-Type": f'multipart/related; type="{kind}"{header_boundary}',
        "Accept": "application/dicom+json"})
    _check(response)


@SETTINGS
@given(token=st.text(min_size=0, max_size=120), pin=st.one_of(st.none(), st.text(max_size=200)),
       tail=st.sampled_from(["", "/dicom-web/studies", "/session", "/download",
                             "/dicom-web/studies/1.2.3/series/4.5/instances/6.7/frames/1"]))
def test_share_tokens_and_pins(server: DicomwebServer, client: httpx.Client, token: str,
                               pin: str | None, tail: str) -> None:
    url = f"{server.root}/s/{quote(token, safe='')}{tail}"
    if tail == "/session":
        response = client.post(url, json={"pin": pin})
    else:
        response = client.get(url)
    assert response.status_code < 500, (url, response.text[:200])


@pytest.fixture(scope="module")
def instance_path(server: DicomwebServer, client: httpx.Client) -> str:
    found = client.get(f"{server.url}/instances", params={"limit": 1}, headers=AUTH).json()[0]
    return "/studies/{}/series/{}/instances/{}".format(
        *(found[tag]["Value"][0] for tag in ("0020000D", "0020000E", "00080018")))


NUMBER = st.one_of(st.integers(-(2**70), 2**70).map(str), st.floats().map(str),
                   st.text(alphabet="0123456789-+.,eE", max_size=30))


@SETTINGS
@given(frames=st.lists(st.integers(-3, 2**66), min_size=1, max_size=300),
       name=st.sampled_from(["offset", "limit", "quality", "viewport", "window"]), value=NUMBER,
       resource=st.sampled_from(["frames", "rendered", "qido"]))
def test_frame_lists_and_numbers(server: DicomwebServer, client: httpx.Client, instance_path: str,
                                 frames: list[int], name: str, value: str, resource: str) -> None:
    """Any frame list and any numeric parameter: a JSON 4xx or an answer no larger than the
    instance's frames once (the one frame of a CT here)."""
    if resource == "frames":
        response = client.get(f"{server.url}{instance_path}/frames/{','.join(map(str, frames))}",
                              params={name: value}, headers={**AUTH, "Accept": "*/*"})
        if response.status_code == 200:
            assert frames == [1]
            assert len(response.content) < 128 * 128 * 2 + 1024
    elif resource == "rendered":
        response = client.get(f"{server.url}{instance_path}/rendered", params={name: value}, headers=AUTH)
    else:
        response = client.get(f"{server.url}/studies", params={name: value}, headers=AUTH)
    _check(response)
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/json")


def test_server_still_answers_after_the_fuzzing(server: DicomwebServer, client: httpx.Client) -> None:
    assert client.get(f"{server.url}/studies", headers=AUTH).status_code == 200
