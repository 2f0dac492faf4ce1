"""The HTTP API on a real index: auth, QIDO-RS matching, JSON errors, health, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.sample_study import SampleStudySpec, build_sample_study
from storage import (
    FilesystemObjectStore,
    IndexRepository,
    InstanceRecord,
    create_index_engine,
    migrate,
)
from tests.support.services import free_port
from web_viewer_api import ApiConfig, create_app

TOKEN = "api-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    migrate(engine)
    index = IndexRepository(engine)
    for study, date, patient in (("2.25.1", "20250105", "PONE"), ("2.25.2", "20250601", "PTWO")):
        for dataset in build_sample_study(SampleStudySpec(ct_slices=2, mr_slices=1, ct_size=8, mr_size=8)):
            dataset.StudyInstanceUID = study
            series_number = 1 if dataset.Modality == "CT" else 2
            dataset.SeriesInstanceUID = f"{study}.{series_number}"
            dataset.SOPInstanceUID = f"{study}.{series_number}.{dataset.InstanceNumber}"
            dataset.StudyDate, dataset.PatientID = date, patient
            index.upsert_instance(InstanceRecord.from_dataset(
                dataset, object_key="studies/x.dcm", size_bytes=1, sha256="0" * 64,
                transfer_syntax_uid="1.2.840.10008.1.2.1", site_id="site1"))
    app = create_app(ApiConfig(admin_token=TOKEN), index, FilesystemObjectStore(tmp_path / "objects"))
    return TestClient(app)


def _uids(body: list[dict[str, dict[str, list[str]]]]) -> list[str]:
    return [item["0020000D"]["Value"][0] for item in body]


def test_missing_or_wrong_token_is_401_with_a_json_body(client: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        response = client.get("/dicom-web/studies", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_search_for_studies_returns_dicom_json(client: TestClient) -> None:
    response = client.get("/dicom-web/studies", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/dicom+json")
    body = response.json()
    assert _uids(body) == ["2.25.2", "2.25.1"]
    first = body[0]
    assert first["00201208"] == {"vr": "IS", "Value": [3]}
    assert first["00201206"] == {"vr": "IS", "Value": [2]}
    assert first["00080061"] == {"vr": "CS", "Value": ["CT", "MR"]}
    assert first["00081190"]["Value"][0].endswith("/dicom-web/studies/2.25.2")


@pytest.mark.parametrize(("query", "expected"), [
    ("PatientID=PONE", ["2.25.1"]),
    ("00100020=PTWO", ["2.25.2"]),
    ("StudyDate=20250101-20250131", ["2.25.1"]),
    ("StudyDate=20250201-", ["2.25.2"]),
    ("ModalitiesInStudy=MR", ["2.25.2", "2.25.1"]),
    ("ModalitiesInStudy=US", []),
    ("StudyInstanceUID=2.25.1,2.25.2", ["2.25.2", "2.25.1"]),
    ("StudyInstanceUID=2.25.1", ["2.25.1"]),
    ("limit=1", ["2.25.2"]),
    ("limit=1&offset=1", ["2.25.1"]),
])
def test_study_matching(client: TestClient, query: str, expected: list[str]) -> None:
    response = client.get(f"/dicom-web/studies?{query}", headers=AUTH)
    assert response.status_code == 200
    assert _uids(response.json()) == expected


@pytest.mark.parametrize("query", ["StudyDate=2025-01-01", "limit=0", "limit=100000", "offset=-1",
                                   "NotAnAttribute=1", "limit=abc"])
def test_bad_query_is_400_with_a_json_error(client: TestClient, query: str) -> None:
    response = client.get(f"/dicom-web/studies?{query}", headers=AUTH)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"


def test_unsupported_matching_key_is_ignored_with_a_warning(client: TestClient) -> None:
    response = client.get("/dicom-web/studies?Manufacturer=X", headers=AUTH)
    assert response.status_code == 200 and len(response.json()) == 2
    assert "Manufacturer" in response.headers["warning"]


def test_fuzzy_patient_name_matching_is_supported(client: TestClient) -> None:
    studies = client.get("/dicom-web/studies", headers=AUTH).json()
    name = studies[0]["00100010"]["Value"][0]["Alphabetic"]
    last_word = name.replace("^", " ").split()[-1]
    exact = client.get(f"/dicom-web/studies?PatientName={last_word.lower()}", headers=AUTH)
    assert exact.status_code == 200 and exact.json() == []
    fuzzy = client.get(f"/dicom-web/studies?PatientName={last_word.lower()}&fuzzymatching=true",
                       headers=AUTH)
    assert fuzzy.status_code == 200 and "fuzzy" not in fuzzy.headers.get("warning", "")
    assert studies[0]["0020000D"] in [s["0020000D"] for s in fuzzy.json()]


@pytest.mark.parametrize("path", ["ReferencedStudySequence.ReferencedSOPInstanceUID",
                                  "00081110.00081155", "ProcedureCodeSequence.CodeValue"])
def test_sequence_matching_keys_are_ignored_with_a_warning(client: TestClient, path: str) -> None:
    """The index keeps no sequence: a sequence attribute path is a valid key, ignored."""
    response = client.get(f"/dicom-web/studies?{path}=1.2.3", headers=AUTH)
    assert response.status_code == 200 and len(response.json()) == 2
    assert "Sequence." in response.headers["warning"]


@pytest.mark.parametrize("path", ["PatientID.PatientName", "ReferencedStudySequence.NoSuchThing",
                                  "Nothing.ReferencedSOPInstanceUID", ".PatientID",
                                  "ReferencedStudySequence."])
def test_malformed_attribute_paths_are_400(client: TestClient, path: str) -> None:
    response = client.get(f"/dicom-web/studies?{path}=1", headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"


def test_unacceptable_media_type_is_406(client: TestClient) -> None:
    response = client.get("/dicom-web/studies", headers={**AUTH, "Accept": "application/dicom+xml"})
    assert response.status_code == 406
    assert response.json()["error"]["code"] == "not_acceptable"


def test_unknown_path_is_a_json_404(client: TestClient) -> None:
    response = client.get("/nothing-here", headers=AUTH)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_healthz_reports_components(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "components": {"index": "ok", "object_store": "ok"}}


def test_healthz_is_503_when_a_component_is_down(tmp_path: Path) -> None:
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    migrate(engine)

    def worker_down() -> None:
        raise FileNotFoundError("worker.ready")

    app = create_app(ApiConfig(TOKEN, {"worker": worker_down}), IndexRepository(engine),
                     FilesystemObjectStore(tmp_path / "objects"))
    response = TestClient(app).get("/healthz")
    assert response.status_code == 503
    assert response.json()["components"]["worker"].startswith("unavailable")


def test_metrics_count_requests(client: TestClient) -> None:
    client.get("/dicom-web/studies", headers=AUTH)
    text = client.get("/metrics/").text
    assert 'dicom_gateway_http_requests_total{method="GET",route="/dicom-web/studies",status="200"}' in text


def test_metrics_count_quarantined_instances_by_reason(tmp_path: Path) -> None:
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    migrate(engine)
    folder = tmp_path / "quarantine" / "site1" / "batch"
    folder.mkdir(parents=True)
    for number, reason in enumerate(["BurnedInAnnotationRisk", "BurnedInAnnotationRisk", "InvalidDicomError"]):
        (folder / f"{number}.dcm.reason.json").write_text(json.dumps({"reason": reason}))
    app = create_app(ApiConfig(TOKEN, quarantine_dir=tmp_path / "quarantine"), IndexRepository(engine),
                     FilesystemObjectStore(tmp_path / "objects"))
    text = TestClient(app).get("/metrics/").text
    assert 'dicom_gateway_quarantined_instances{reason="BurnedInAnnotationRisk"} 2.0' in text
    assert 'dicom_gateway_quarantined_instances{reason="InvalidDicomError"} 1.0' in text


def test_livez_answers_while_readyz_reports_an_unreachable_broker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    """The production API's readiness includes the broker (STOW-RS needs it): a Redis that
    is not there makes /readyz and /healthz 503 while /livez stays 200."""
    from gateway.components import build_api
    from gateway.settings import Settings

    monkeypatch.setenv("DICOM_GATEWAY_PSEUDONYM_SECRET", "ready-secret-0123456789abcdef")
    monkeypatch.setenv("DICOM_GATEWAY_ADMIN_TOKEN", "ready-token-0123456789abcdef")
    closed = f"redis://127.0.0.1:{free_port()}/0"
    down = TestClient(build_api(Settings(data_dir=tmp_path / "a", broker_url=closed)))
    assert down.get("/livez").status_code == 200
    for path in ("/readyz", "/healthz"):
        answer = down.get(path)
        assert answer.status_code == 503 and answer.json()["components"]["broker"].startswith("unavailable")
    up = TestClient(build_api(Settings(data_dir=tmp_path / "b", broker_url=redis_url)))
    answer = up.get("/readyz")
    assert answer.status_code == 200 and answer.json()["components"]["broker"] == "ok"


def test_the_inline_read_budget_setting_reaches_the_api(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`HTTP__INLINE_READ_BUDGET_MS`: searches of the SQLite index on the event loop by
    default, every one in a worker thread with 0."""
    from gateway.components import build_api
    from gateway.settings import Settings

    monkeypatch.setenv("DICOM_GATEWAY_PSEUDONYM_SECRET", "inline-secret-0123456789abcdef")
    monkeypatch.setenv("DICOM_GATEWAY_ADMIN_TOKEN", TOKEN)
    for budget, inline in ((None, 1), ("0", 0)):
        if budget is not None:
            monkeypatch.setenv("DICOM_GATEWAY_HTTP__INLINE_READ_BUDGET_MS", budget)
        app = build_api(Settings(data_dir=tmp_path / f"budget-{budget}"))
        with TestClient(app) as client:
            answer = client.get("/dicom-web/studies", headers={"Authorization": f"Bearer {TOKEN}"})
            assert answer.status_code == 200 and answer.json() == []
            assert app.state.inline_reads.answered == inline


def test_startup_removes_old_parts_of_interrupted_uploads(tmp_path: Path) -> None:
    import os
    import time

    from spool import Spool
    from web_viewer_api import StowTarget

    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    migrate(engine)
    target = StowTarget(Spool(tmp_path / "spool", "site1"), lambda site, batch: None)
    target.incoming.mkdir(parents=True)
    orphan, current = target.incoming / ".stow-old.part", target.incoming / ".stow-new.part"
    orphan.write_bytes(b"half an instance")
    current.write_bytes(b"an upload in progress elsewhere")
    two_hours_ago = time.time() - 7200
    os.utime(orphan, (two_hours_ago, two_hours_ago))
    app = create_app(ApiConfig(TOKEN, stow=target), IndexRepository(engine),
                     FilesystemObjectStore(tmp_path / "objects"))
    with TestClient(app) as client:  # runs the lifespan
        assert client.get("/livez").status_code == 200
    assert not orphan.exists() and current.exists()


def test_database_unreachable_is_503_and_a_broken_schema_is_500(tmp_path: Path) -> None:
    """A PostgreSQL nobody answers for: 503 + Retry-After (the client retries); a schema
    that is not there: 500 (retrying will not help: ours to fix). Both JSON."""
    from sqlalchemy import text

    from tests.support.services import free_port

    down = IndexRepository(create_index_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/none"))
    with TestClient(create_app(ApiConfig(admin_token=TOKEN), down,
                               FilesystemObjectStore(tmp_path / "objects"))) as unreachable:
        answer = unreachable.get("/dicom-web/studies?PatientID=X", headers=AUTH)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert answer.json()["error"]["code"] == "unavailable"
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    migrate(engine)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE instances"))
    with TestClient(create_app(ApiConfig(admin_token=TOKEN), IndexRepository(engine),
                               FilesystemObjectStore(tmp_path / "objects")),
                    raise_server_exceptions=False) as broken:
        answer = broken.get("/dicom-web/instances", headers=AUTH)
    assert answer.status_code == 500 and answer.json()["error"]["code"] == "internal_error"


@pytest.mark.parametrize(("peer", "forwarded", "client"), [
    ("192.0.2.10", "203.0.113.7", "192.0.2.10"),  # not a listed proxy: its header is ignored
    ("127.0.0.1", "203.0.113.7", "203.0.113.7"),
    ("127.0.0.1", "198.51.100.1, 203.0.113.7, 10.1.2.3", "203.0.113.7"),  # right-most not a proxy
    ("127.0.0.1", "10.0.0.1, 10.0.0.2", "10.0.0.1"),  # proxies all the way: the left-most
    ("127.0.0.1", "not-an-address, 10.0.0.2", "10.0.0.2"),  # nothing left of garbage believed
    ("127.0.0.1", "", "127.0.0.1"),
    ("::ffff:127.0.0.1", "2001:db8::1", "2001:db8::1"),  # an IPv4 peer on an IPv6 socket
    ("127.0.0.1", "203.0.113.7:51234", "203.0.113.7"),  # balancers that add the port
    ("127.0.0.1", "[2001:db8::7]:51234", "2001:db8::7"),
])
def test_forwarded_for_is_believed_only_through_listed_proxies(peer: str, forwarded: str,
                                                               client: str) -> None:
    from web_viewer_api.proxies import forwarded_client, parse_networks

    assert forwarded_client(peer, forwarded, parse_networks(["127.0.0.1", "10.0.0.0/8"])) == client
    assert forwarded_client(peer, forwarded, ()) == peer


def test_trusted_proxies_setting_refuses_what_is_not_an_address(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.settings import Settings

    monkeypatch.setenv("DICOM_GATEWAY_HTTP__TRUSTED_PROXIES", '["10.0.0.5", "10.1.0.0/24", "::1"]')
    assert Settings().http.trusted_proxies == ["10.0.0.5", "10.1.0.0/24", "::1"]
    monkeypatch.delenv("DICOM_GATEWAY_HTTP__TRUSTED_PROXIES")
    assert Settings().http.trusted_proxies == []
    monkeypatch.setenv("DICOM_GATEWAY_HTTP__TRUSTED_PROXIES", '["proxy.example"]')
    with pytest.raises(ValueError, match="trusted_proxies"):
        Settings()
