"""Share links end to end on a real server over loopback: scope (IDOR suite at every
DICOMweb level), expiry, revocation, PIN, locks, use limits, download, access log."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from access import sha256_hex
from storage import InstanceQuery, SeriesQuery, ShareItemRecord, ShareRecord, StudyQuery
from tests.support.dicomweb_server import TOKEN, DicomwebServer

ADMIN = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Accept": "application/dicom+json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomwebServer]:
    with DicomwebServer(tmp_path_factory.mktemp("shares"), studies=3) as running:
        yield running


@pytest.fixture(scope="module")
def studies(server: DicomwebServer) -> list[str]:
    found = sorted(s.study_instance_uid for s in server.index.search_studies(StudyQuery()))
    assert len(found) == 3
    return found


def _create(server: DicomwebServer, **body: object) -> dict[str, str]:
    response = httpx.post(f"{server.root}/api/shares", headers=ADMIN,
                          json={"expires_in": 3600, **body})
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    return response.json()


def _tree(server: DicomwebServer, study: str) -> tuple[str, str]:
    instance = server.index.search_instances(InstanceQuery(study_instance_uid=study, limit=1))[0]
    return instance.series_instance_uid, instance.sop_instance_uid


def test_share_url_token_is_long_random_and_stored_only_as_a_hash(server: DicomwebServer,
                                                                  studies: list[str]) -> None:
    created = _create(server, study_uids=[studies[0]])
    token = created["url"].rsplit("/s/", 1)[1]
    assert created["token"] == token and len(token) >= 22  # >= 128 bits in base64url
    assert created["url"].startswith(server.root + "/s/")
    assert server.access.share_by_token(sha256_hex(token)) is not None
    rows = server.index.engine.raw_connection()
    try:
        dump = "\n".join(str(row) for table in ("shares", "share_sessions", "audit_events")
                         for row in rows.execute(f"SELECT * FROM {table}").fetchall())
    finally:
        rows.close()
    assert token not in dump
    second = _create(server, study_uids=[studies[0]])
    assert second["token"] != token


def test_share_reads_its_study_and_nothing_else_at_any_level(server: DicomwebServer,
                                                             studies: list[str]) -> None:
    """IDOR suite: another study's UIDs, guessed at every level, look exactly missing."""
    mine, other = studies[0], studies[1]
    token = _create(server, study_uids=[mine])["token"]
    root = f"{server.root}/s/{token}/dicom-web"
    listed = httpx.get(f"{root}/studies", headers=JSON).json()
    assert [s["0020000D"]["Value"][0] for s in listed] == [mine]
    assert httpx.get(f"{root}/studies?StudyInstanceUID={other}", headers=JSON).json() == []
    assert httpx.get(f"{root}/series", headers=JSON).json()
    assert {s["0020000D"]["Value"][0] for s in httpx.get(f"{root}/series", headers=JSON).json()} == {mine}
    assert {i["0020000D"]["Value"][0] for i in httpx.get(f"{root}/instances", headers=JSON).json()} == {mine}
    my_series, my_sop = _tree(server, mine)
    other_series, other_sop = _tree(server, other)
    missing = "1.2.826.0.1.3680043.8.498.999999"
    for study, series, sop in ((other, other_series, other_sop), (mine, other_series, other_sop),
                               (mine, my_series, other_sop)):
        paths = [f"/studies/{study}/series/{series}/instances/{sop}/metadata",
                 f"/studies/{study}/series/{series}/instances/{sop}/frames/1",
                 f"/studies/{study}/series/{series}/instances/{sop}/rendered",
                 f"/studies/{study}/series/{series}/instances/{sop}/thumbnail",
                 f"/studies/{study}/series/{series}/instances/{sop}/bulkdata/7fe00010"]
        if series == other_series:
            paths += [f"/studies/{study}/series/{series}/metadata",
                      f"/studies/{study}/series/{series}/thumbnail",
                      f"/studies/{study}/series/{series}/rendered"]
        for path in paths:
            answer = httpx.get(root + path)
            guessed_missing = httpx.get(root + path.replace(sop, missing).replace(series, missing)
                                        .replace(study, missing))
            assert answer.status_code == 404, path
            assert answer.json() == guessed_missing.json(), path
    for path in (f"/studies/{other}/metadata", f"/studies/{other}/thumbnail"):
        assert httpx.get(root + path).status_code == 404
        assert httpx.get(root + path).json() == httpx.get(root + path.replace(other, missing)).json()
    assert httpx.get(f"{root}/studies/{other}/series", headers=JSON).json() == []
    assert httpx.get(f"{root}/studies/{other}/instances", headers=JSON).json() == []
    # what is in scope answers
    assert httpx.get(f"{root}/studies/{mine}/series/{my_series}/metadata").status_code == 200
    assert httpx.get(f"{root}/studies/{mine}/series/{my_series}/instances/{my_sop}/thumbnail").status_code == 200
    # the share opens nothing outside its root, and writes nothing
    assert httpx.post(f"{root}/studies", content=b"x",
                      headers={"Content-Type": "application/dicom"}).status_code == 405
    assert httpx.get(f"{server.url}/studies", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert httpx.get(f"{server.root}/api/shares", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_series_share_shows_only_those_series(server: DicomwebServer, studies: list[str]) -> None:
    study = studies[0]
    series = server.index.search_series(SeriesQuery(study_instance_uid=study))
    assert len(series) == 2
    shared, hidden = series[0].series_instance_uid, series[1].series_instance_uid
    token = _create(server, series=[{"study_uid": study, "series_uid": shared}])["token"]
    root = f"{server.root}/s/{token}/dicom-web"
    found = httpx.get(f"{root}/studies/{study}/series", headers=JSON).json()
    assert [s["0020000E"]["Value"][0] for s in found] == [shared]
    assert httpx.get(f"{root}/studies/{study}/series/{hidden}/metadata").status_code == 404
    assert httpx.get(f"{root}/studies/{study}/series/{shared}/metadata").status_code == 200
    instances = httpx.get(f"{root}/studies/{study}/instances", headers=JSON).json()
    assert {i["0020000E"]["Value"][0] for i in instances} == {shared}
    # the study's counts and modalities tell nothing of the series left out
    listed = httpx.get(f"{root}/studies", headers=JSON).json()
    assert listed[0]["00201206"]["Value"] == [1]
    assert listed[0]["00201208"]["Value"] == [series[0].number_of_instances]
    assert listed[0]["00080061"]["Value"] == [series[0].modality]


def test_expired_share_returns_410(server: DicomwebServer, studies: list[str]) -> None:
    now = dt.datetime.now(dt.UTC)
    token = "expired-share-token-0123456789abcdef"
    server.access.add_share(ShareRecord(
        share_id="expired0000000001", created_at=now - dt.timedelta(days=2), created_by="test",
        expires_at=now - dt.timedelta(seconds=1), revoked_at=None, pin_hash=None, pin_failures=0,
        locked_at=None, max_uses=None, uses=0, permissions=frozenset(), recipient="", recipient_email="",
        note="", site_ids=None, items=(ShareItemRecord(studies[0]),)), sha256_hex(token))
    page = httpx.get(f"{server.root}/s/{token}")
    assert page.status_code == 410
    assert "text/html" in page.headers["content-type"] and "expir" in page.text
    api = httpx.get(f"{server.root}/s/{token}/dicom-web/studies", headers=JSON)
    assert api.status_code == 410 and api.json()["error"]["code"] == "gone"


def test_revoked_share_returns_410_at_once(server: DicomwebServer, studies: list[str]) -> None:
    created = _create(server, study_uids=[studies[0]])
    root = f"{server.root}/s/{created['token']}"
    assert httpx.get(f"{root}/dicom-web/studies", headers=JSON).status_code == 200
    revoked = httpx.delete(f"{server.root}/api/shares/{created['id']}", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert httpx.get(f"{root}/dicom-web/studies", headers=JSON).status_code == 410
    assert httpx.get(root).status_code == 410
    assert httpx.delete(f"{server.root}/api/shares/nosuchshare", headers=ADMIN).status_code == 404


def test_pin_share_needs_a_session_and_sets_a_strict_cookie(server: DicomwebServer,
                                                            studies: list[str]) -> None:
    created = _create(server, study_uids=[studies[0]], pin="482913")
    root = f"{server.root}/s/{created['token']}"
    refused = httpx.get(f"{root}/dicom-web/studies", headers=JSON)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "share_session_required"
    form = httpx.get(root)
    assert form.status_code == 200 and 'name="pin"' in form.text
    assert "frame-ancestors 'none'" in form.headers["content-security-policy"]
    wrong = httpx.post(f"{root}/session", data={"pin": "000000"})
    assert wrong.status_code == 401 and "4 tentative(s) restante(s)" in wrong.text
    opened = httpx.post(f"{root}/session", data={"pin": "482913"})
    assert opened.status_code == 303 and opened.headers["location"].startswith(f"/s/{created['token']}?lang=")
    cookie = opened.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert f"path=/s/{created['token']}".lower() in cookie
    session = opened.cookies["dgw_share_session"]
    with httpx.Client(cookies={"dgw_share_session": session}) as browser:
        assert browser.get(f"{root}/dicom-web/studies", headers=JSON).status_code == 200
        page = browser.get(root)
        assert page.status_code == 200 and "/thumbnail" in page.text
    # a session opens only its own share
    other = _create(server, study_uids=[studies[1]], pin="482913")
    with httpx.Client(cookies={"dgw_share_session": session}) as browser:
        assert browser.get(f"{server.root}/s/{other['token']}/dicom-web/studies",
                           headers=JSON).status_code == 401
    detail = httpx.get(f"{server.root}/api/shares/{created['id']}", headers=ADMIN).json()
    assert detail["has_pin"] and detail["uses"] == 1 and detail["pin_failures"] == 1  # kept


def test_share_locks_after_too_many_wrong_pins(server: DicomwebServer, studies: list[str]) -> None:
    created = _create(server, study_uids=[studies[0]], pin="112233")
    root = f"{server.root}/s/{created['token']}"
    for attempt in range(4):
        answer = httpx.post(f"{root}/session", json={"pin": f"99{attempt}"})
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "wrong_pin"
    locked = httpx.post(f"{root}/session", json={"pin": "999"})
    assert locked.status_code == 403 and "locked" in locked.json()["error"]["message"]
    right = httpx.post(f"{root}/session", json={"pin": "112233"})
    assert right.status_code == 403
    detail = httpx.get(f"{server.root}/api/shares/{created['id']}", headers=ADMIN).json()
    assert detail["locked"] and detail["status"] == "locked" and detail["uses"] == 0


def test_every_wrong_pin_counts_over_the_shares_life(server: DicomwebServer,
                                                     studies: list[str]) -> None:
    """4 wrong, 1 right, 1 wrong: the right PIN resets nothing, the share locks at the 5th
    wrong one (SHARES__PIN_LOCK_AFTER=5), and then refuses the right PIN too."""
    created = _create(server, study_uids=[studies[0]], pin="246810")
    root = f"{server.root}/s/{created['token']}"
    for attempt in range(4):
        assert httpx.post(f"{root}/session", json={"pin": f"1357{attempt}"}).status_code == 401
    assert httpx.post(f"{root}/session", json={"pin": "246810"}).status_code == 201
    locked = httpx.post(f"{root}/session", json={"pin": "000000"})
    assert locked.status_code == 403 and "locked" in locked.json()["error"]["message"]
    assert httpx.post(f"{root}/session", json={"pin": "246810"}).status_code == 403
    detail = httpx.get(f"{server.root}/api/shares/{created['id']}", headers=ADMIN).json()
    assert detail["pin_failures"] == 5 and detail["status"] == "locked"


def test_racing_wrong_pins_check_no_more_than_the_lock_allows(server: DicomwebServer,
                                                              studies: list[str]) -> None:
    """20 wrong PINs sent at once: at most 5 are checked (each counted before its slow
    check), the others are refused unchecked; the share ends locked with 5 failures."""
    from concurrent.futures import ThreadPoolExecutor

    created = _create(server, study_uids=[studies[0]], pin="864200")
    root = f"{server.root}/s/{created['token']}"
    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(lambda n: httpx.post(f"{root}/session", json={"pin": f"{n:06d}"},
                                                      timeout=60).status_code, range(20)))
    assert statuses.count(401) <= 4 and set(statuses) <= {401, 403, 429}, statuses
    detail = httpx.get(f"{server.root}/api/shares/{created['id']}", headers=ADMIN).json()
    assert detail["pin_failures"] == 5 and detail["status"] == "locked"


def test_the_note_is_shown_only_once_the_pin_opened_a_session(server: DicomwebServer,
                                                              studies: list[str]) -> None:
    note = "Avis demandé : nodule lobaire supérieur droit"
    for extra in ({"pin": "192837"}, {"max_uses": 3}):
        created = _create(server, study_uids=[studies[0]], note=note, recipient="Dr Martin", **extra)
        root = f"{server.root}/s/{created['token']}"
        before = httpx.get(root)
        assert before.status_code == 200 and 'action="/s/' in before.text
        assert "nodule" not in before.text and "Martin" not in before.text
        wrong = httpx.post(f"{root}/session", data={"pin": "000000"}) if "pin" in extra else None
        assert wrong is None or ("nodule" not in wrong.text and wrong.status_code == 401)
        with httpx.Client() as browser:
            opened = browser.post(f"{root}/session", data={"pin": extra.get("pin", "")},
                                  follow_redirects=True)
            assert opened.status_code == 200 and 'id="viewer"' in opened.text
            assert "nodule lobaire sup" in opened.text  # data-note, and the noscript list


def test_max_uses_counts_viewer_sessions_not_image_requests(server: DicomwebServer,
                                                            studies: list[str]) -> None:
    created = _create(server, study_uids=[studies[0]], max_uses=2)
    root = f"{server.root}/s/{created['token']}"
    first = httpx.get(root)
    assert 'action="/s/' in first.text  # a button, so link previews cannot spend a use
    sessions = []
    for _ in range(2):
        opened = httpx.post(f"{root}/session", json={})
        assert opened.status_code == 201
        sessions.append(opened.cookies["dgw_share_session"])
    with httpx.Client(cookies={"dgw_share_session": sessions[0]}) as browser:
        for _ in range(5):
            assert browser.get(f"{root}/dicom-web/studies", headers=JSON).status_code == 200
    exhausted = httpx.post(f"{root}/session", json={})
    assert exhausted.status_code == 410
    with httpx.Client(cookies={"dgw_share_session": sessions[1]}) as browser:
        assert browser.get(f"{root}/dicom-web/studies", headers=JSON).status_code == 200
    detail = httpx.get(f"{server.root}/api/shares/{created['id']}", headers=ADMIN).json()
    assert detail["uses"] == 2 and detail["status"] == "used_up"


def test_download_only_when_allowed_and_streams_a_zip_of_the_study(
        server: DicomwebServer, studies: list[str], tmp_path: Path) -> None:
    study = studies[0]
    view_only = _create(server, study_uids=[study])["token"]
    assert httpx.get(f"{server.root}/s/{view_only}/download").status_code == 403
    retrieve = httpx.get(f"{server.root}/s/{view_only}/dicom-web/studies/{study}",
                         headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert retrieve.status_code == 403
    allowed = _create(server, study_uids=[study], permissions=["download"])["token"]
    answer = httpx.get(f"{server.root}/s/{allowed}/download")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/zip"
    assert "chunked" in answer.headers.get("transfer-encoding", "")
    archive = zipfile.ZipFile(io.BytesIO(answer.content))
    assert archive.testzip() is None
    expected = {i.sop_instance_uid for i in server.index.search_instances(
        InstanceQuery(study_instance_uid=study, limit=1000))}
    found = {pydicom.dcmread(io.BytesIO(archive.read(name))).SOPInstanceUID
             for name in archive.namelist() if name != "DICOMDIR"}
    assert found == expected
    unpacked = tmp_path / "unpacked"
    archive.extractall(unpacked)
    _check_file_set(unpacked, expected)
    assert httpx.get(f"{server.root}/s/{allowed}/dicom-web/studies/{study}",
                     headers={"Accept": 'multipart/related; type="application/dicom"'}).status_code == 200


def test_access_log_records_reads_without_the_token(server: DicomwebServer, studies: list[str]) -> None:
    created = _create(server, study_uids=[studies[0]], recipient="Dr Martin", note="avis")
    root = f"{server.root}/s/{created['token']}"
    httpx.get(f"{root}/dicom-web/studies", headers={**JSON, "User-Agent": "viewer-test/1"})
    httpx.get(f"{root}/dicom-web/studies/{studies[1]}/metadata", headers={"User-Agent": "viewer-test/1"})
    detail = httpx.get(f"{server.root}/api/shares/{created['id']}", headers=ADMIN).json()
    log = detail["access_log"]
    reads = [e for e in log if e["user_agent"] == "viewer-test/1"]
    assert {(e["outcome"], e["status_code"]) for e in reads} == {("success", 200), ("failure", 404)}
    assert all(e["address"] == "127.0.0.1" for e in reads)
    assert all(created["token"] not in e["resource"] for e in log)
    assert any(e["resource"].startswith(f"/s/{created['id']}/dicom-web/studies") for e in reads)
    assert detail["recipient"] == "Dr Martin" and detail["note"] == "avis"
    listed = httpx.get(f"{server.root}/api/shares?active=true", headers=ADMIN).json()
    assert created["id"] in {s["id"] for s in listed}
    assert all("token" not in s for s in listed)


@pytest.mark.parametrize(("body", "status"), [
    ({"study_uids": ["1.2.3.4"]}, 404),
    ({"study_uids": ["not-a-uid"]}, 400),
    ({"study_uids": []}, 400),
    ({"study_uids": ["{study}"], "expires_in": 0}, 400),
    ({"study_uids": ["{study}"], "expires_in": 365 * 86400}, 400),
    ({"study_uids": ["{study}"], "pin": "12"}, 400),
    ({"study_uids": ["{study}"], "pin": ""}, 400),
    ({"study_uids": ["{study}"], "pin": "9" * 129}, 400),
    ({"study_uids": ["{study}"], "max_uses": 0}, 400),
    ({"study_uids": ["{study}"], "unknown": 1}, 400),
    ({"study_uids": ["{study}"], "notify": True}, 400),
])
def test_bad_share_requests_are_json_4xx(server: DicomwebServer, studies: list[str],
                                         body: dict[str, object], status: int) -> None:
    payload = {"expires_in": 3600, **body}
    payload["study_uids"] = [u.replace("{study}", studies[0]) for u in payload["study_uids"]]  # type: ignore[union-attr]
    answer = httpx.post(f"{server.root}/api/shares", headers=ADMIN, json=payload)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"]


def test_permissions_are_a_set_and_allow_download_is_one_of_them(
        server: DicomwebServer, studies: list[str]) -> None:
    """`permissions: ["download"]` and the older `allow_download: true` make the same share;
    the share shows both; an unknown permission is refused by name."""
    study = studies[0]
    shown = []
    for body in ({"permissions": ["download"]}, {"allow_download": True}, {}):
        created = _create(server, study_uids=[study], **body)
        public = httpx.get(f"{server.root}/api/shares/{created['id']}", headers=ADMIN).json()
        shown.append((public["permissions"], public["allow_download"]))
        answer = httpx.get(f"{server.root}/s/{created['token']}/download")
        assert answer.status_code == (200 if body else 403)
    assert shown == [(["download"], True), (["download"], True), ([], False)]
    refused = httpx.post(f"{server.root}/api/shares", headers=ADMIN, json={
        "study_uids": [study], "expires_in": 60, "permissions": ["delete"]})
    assert refused.status_code == 400 and "download" in refused.text


def test_unknown_share_token_is_404_page(server: DicomwebServer) -> None:
    page = httpx.get(f"{server.root}/s/not-a-real-token-at-all-0123456789")
    assert page.status_code == 404 and "text/html" in page.headers["content-type"]
    api = httpx.get(f"{server.root}/s/not-a-real-token-at-all-0123456789/dicom-web/studies")
    assert api.status_code == 404 and api.json()["error"]["code"] == "not_found"


def test_site_lookup_takes_original_identifiers_in_the_body(server: DicomwebServer,
                                                          studies: list[str]) -> None:
    found = httpx.post(f"{server.root}/api/site/lookup", headers=ADMIN,
                       json={"accession_number": "ACCX00001"})
    assert found.status_code == 200, found.text
    assert found.headers["cache-control"] == "no-store"
    uids = found.json()["study_uids"]
    assert len(uids) == 1 and uids[0] in studies
    # the studies, never a pseudonym: one would let a caller test candidate identifiers
    assert set(found.json()) == {"study_uids", "studies"}
    assert [s["0020000D"]["Value"][0] for s in found.json()["studies"]] == uids
    assert httpx.post(f"{server.root}/api/site/lookup", headers=ADMIN,
                      json={"accession_number": "NOPE"}).json() == {"study_uids": [], "studies": []}
    by_patient = httpx.post(f"{server.root}/api/site/lookup", headers=ADMIN,
                            json={"patient_id": "IPP-EXTRA-2"}).json()
    assert len(by_patient["study_uids"]) in (0, 1)
    empty = httpx.post(f"{server.root}/api/site/lookup", headers=ADMIN, json={})
    assert empty.status_code == 400 and empty.json()["error"]["code"] == "bad_request"
    unknown = httpx.post(f"{server.root}/api/site/lookup", headers=ADMIN,
                         json={"accession_number": "ACCX00001", "extra": "field"})
    assert unknown.status_code == 400


def test_site_lookup_audit_records_counts_never_identifiers(server: DicomwebServer,
                                                            studies: list[str]) -> None:
    assert httpx.post(f"{server.root}/api/site/lookup", headers=ADMIN,
                      json={"accession_number": "ACCX00001"}).status_code == 200
    # the former lookup took them in the query string: gone, and its query is not kept
    moved = httpx.get(f"{server.root}/api/studies/lookup", headers=ADMIN,
                      params={"accession_number": "ACCX00001", "patient_id": "IPP-EXTRA-1"})
    assert moved.status_code == 404
    assert "computed at the producing site" in moved.json()["error"]["message"]
    events = httpx.get(f"{server.root}/api/audit?format=jsonl&limit=1000", headers=ADMIN).text
    assert "ACCX00001" not in events and "IPP-EXTRA-1" not in events
    lookups = [json.loads(line) for line in events.splitlines()
               if json.loads(line)["action"] == "study.lookup"]
    assert lookups and lookups[-1]["detail"] == {"matches": 1, "sites": ["site1"]}
    assert lookups[-1]["resource"] == "/api/site/lookup"
    assert any(json.loads(line)["resource"] ==
               "/api/studies/lookup?(withheld)&(withheld)"  # not even the parameters' names
               for line in events.splitlines())


def test_token_never_in_the_audit_trail(server: DicomwebServer, studies: list[str]) -> None:
    created = _create(server, study_uids=[studies[0]])
    httpx.get(f"{server.root}/s/{created['token']}")
    events = httpx.get(f"{server.root}/api/audit?format=jsonl", headers=ADMIN)
    assert events.status_code == 200
    assert created["token"] not in events.text and TOKEN not in events.text


def test_share_tables_survive_a_reindex(server: DicomwebServer, studies: list[str],
                                        tmp_path: Path) -> None:
    created = _create(server, study_uids=[studies[0]])
    server.index.clear()
    try:
        assert server.access.share(created["id"]) is not None
    finally:
        from worker.reindex import reindex

        reindex(server.store, server.index)
    assert len(server.index.search_studies(StudyQuery())) == 3


def test_zip_entry_names_cannot_leave_their_folder(server: DicomwebServer, tmp_path: Path) -> None:
    """Instances whose attribute values are '../../etc/passwd', backslashes, a drive
    letter, control characters and a leading slash (a write-back may bring any text): the
    ZIP's names are PS3.10 File IDs the File-set makes (uppercase components of at most 8
    characters) and the DICOMDIR, whatever the values, and unpack inside their folder."""
    import dataclasses

    from gateway.sample_study import SampleStudySpec, write_sample_study
    from storage import InstanceRecord

    [source] = write_sample_study(tmp_path / "hostile", SampleStudySpec(ct_slices=1, mr_slices=0,
                                                                       seed=4711, ct_size=32))
    hostile_values = ["../../etc/passwd", "..\\..\\win\\sys", "C:\\evil", "/abs/path",
                      "a\nb\x00c", ".."]
    (server.store.root / "hostile").mkdir()
    records = []
    for n, value in enumerate(hostile_values):
        dataset = pydicom.dcmread(source)
        with pytest.warns(UserWarning):
            dataset.Modality = value
            dataset.StudyDate = "../../.."
        dataset.SeriesInstanceUID = pydicom.uid.generate_uid()
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = \
            pydicom.uid.generate_uid()
        path = server.store.root / "hostile" / f"{n}.dcm"
        dataset.save_as(path)
        record = InstanceRecord.from_dataset(
            dataset, object_key=f"hostile/{n}.dcm", size_bytes=path.stat().st_size,
            sha256="0" * 64, transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID),
            site_id="site1")
        records.append(dataclasses.replace(record, series={**record.series, "modality": value}))
    server.index.upsert_instances(records)
    token = _create(server, study_uids=[records[0].instance["study_instance_uid"]],
                    allow_download=True)["token"]
    answer = httpx.get(f"{server.root}/s/{token}/download")
    assert answer.status_code == 200
    archive = zipfile.ZipFile(io.BytesIO(answer.content))
    names = archive.namelist()
    assert len(names) == len(hostile_values) + 1 and names[-1] == "DICOMDIR"
    file_id = re.compile(r"^[A-Z0-9_]{1,8}(/[A-Z0-9_]{1,8}){0,7}$")
    assert all(file_id.match(name) for name in names), names
    target = tmp_path / "unpacked"
    archive.extractall(target)
    assert all(path.resolve().is_relative_to(target.resolve()) for path in target.rglob("*"))
    _check_file_set(target, {str(r.instance["sop_instance_uid"]) for r in records})


def _check_file_set(root: Path, expected: set[str]) -> None:
    """Read the DICOMDIR with dcmtk (an independent reader): each image record names a file
    of the folder that holds the SOP instance it says, and together they are `expected`."""
    def values(tag: str) -> list[str]:
        dump = subprocess.run(["dcmdump", "+L", "+P", tag, str(root / "DICOMDIR")],
                              capture_output=True, text=True, check=True).stdout
        return re.findall(r"\[([^\]]*)\]", dump)

    pairs = list(zip(values("0004,1500"), values("0004,1511"), strict=True))
    assert {sop for _, sop in pairs} == expected
    for referenced, sop in pairs:
        path = root.joinpath(*referenced.split("\\"))
        assert pydicom.dcmread(path).SOPInstanceUID == sop


def _large_shared_series(server: DicomwebServer, tmp_path: Path, count: int) -> str:
    """A study of `count` instances whose objects are copies of one 512x512 CT file (about
    0.5 MB each): more than socket buffers hold. Its study UID."""
    import dataclasses
    import shutil

    from gateway.sample_study import SampleStudySpec, write_sample_study
    from storage import InstanceRecord

    [source] = write_sample_study(tmp_path / "large", SampleStudySpec(ct_slices=1, mr_slices=0, seed=5150))
    dataset = pydicom.dcmread(source, stop_before_pixels=True)
    record = InstanceRecord.from_dataset(
        dataset, object_key="large/0.dcm", size_bytes=source.stat().st_size, sha256="0" * 64,
        transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID), site_id="site1")
    (server.store.root / "large").mkdir(exist_ok=True)
    for number in range(count):
        shutil.copy(source, server.store.root / "large" / f"{number}.dcm")
    server.index.upsert_instances([dataclasses.replace(record, instance={
        **record.instance, "sop_instance_uid": f"{record.instance['sop_instance_uid']}.{n}",
        "instance_number": n + 1, "object_key": f"large/{n}.dcm"}) for n in range(count)])
    return str(record.instance["study_instance_uid"])


@pytest.mark.parametrize("path", ["download", "dicom-web/studies/{study}"])
def test_revoking_a_share_ends_its_running_downloads(server: DicomwebServer, tmp_path: Path,
                                                     path: str) -> None:
    """A ZIP download and a WADO-RS retrieval through the share have started (first chunk
    read, the server held back by the client's small receive buffer); the sender revokes
    the share: the answer is cut off (never completed-looking) well before its end."""
    import dataclasses
    import socket

    # 80 objects of 0.5 MB: what the kernel's socket buffers (4 MB a side here) and the
    # server's own let it send ahead of the client stays far below half of the answer.
    count = 80
    study = _large_shared_series(server, tmp_path, count)
    created = _create(server, study_uids=[study], allow_download=True)
    url = f"{server.root}/s/{created['token']}/{path.format(study=study)}"
    headers = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    kept = server.app.state.config
    # checked before every object (default: at most once a second), so that what the
    # kernel buffers cannot hide the cut
    server.app.state.config = dataclasses.replace(kept, share_liveness_seconds=0.0)
    small_buffer = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)])
    received = 0
    try:
        with httpx.Client(transport=small_buffer, timeout=30) as client, \
                client.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["cache-control"] == "private, no-store"
            chunks = response.iter_raw(65536)
            received += len(next(chunks))
            revoked = httpx.delete(f"{server.root}/api/shares/{created['id']}", headers=ADMIN)
            assert revoked.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                for chunk in chunks:
                    received += len(chunk)
    finally:
        server.app.state.config = kept
    assert received < count * (server.store.root / "large" / "0.dcm").stat().st_size // 2
    event = next(e for e in httpx.get(f"{server.root}/api/shares/{created['id']}",
                                      headers=ADMIN).json()["access_log"]
                 if e["resource"].startswith(f"/s/{created['id']}/{path.split('/')[0]}"))
    assert event["outcome"] == "failure"


def test_share_answers_are_never_stored_by_caches(server: DicomwebServer, studies: list[str]) -> None:
    """Every answer under /s/{token} is `private, no-store`: the page, DICOMweb (metadata
    and images were `max-age=3600`), the ZIP, and errors."""
    study = studies[0]
    series, sop = _tree(server, study)
    token = _create(server, study_uids=[study], allow_download=True)["token"]
    root = f"{server.root}/s/{token}"
    dicomweb = f"{root}/dicom-web/studies/{study}"
    for url, status in ((root, 200), (f"{dicomweb}/metadata", 200), (f"{root}/dicom-web/studies", 200),
                        (f"{dicomweb}/series/{series}/instances/{sop}/rendered", 200),
                        (f"{dicomweb}/series/{series}/thumbnail", 200), (f"{root}/download", 200),
                        (f"{dicomweb}/series/{series}/instances/{sop}/frames/1", 200),
                        (f"{root}/dicom-web/studies/1.2.3.4/metadata", 404),
                        (f"{server.root}/s/unknown-token-0123456789abcdef", 404)):
        answer = httpx.get(url, headers={"Accept": "*/*"})
        assert answer.status_code == status, url
        assert answer.headers.get_list("cache-control") == ["private, no-store"], url
    retrieved = httpx.get(dicomweb, headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert retrieved.status_code == 200 and retrieved.headers["cache-control"] == "private, no-store"
    # the same resources to a bearer token keep their caching
    cached = httpx.get(f"{server.url}/studies/{study}/metadata", headers=ADMIN)
    assert cached.headers["cache-control"] == "private, max-age=3600"
