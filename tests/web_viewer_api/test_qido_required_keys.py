"""Every required matching key of PS3.18 Table 10.6.1-5 matches, through the real API on
SQLite and PostgreSQL, in the forms PS3.4 C.2.2.2 gives its VR: single value, wildcard
(not for dates, times, UIDs, numbers), list of UIDs, date and time ranges; a Warning
names only the keys that are not matched (optional ones). The stored values are set here,
in the datasets the index is filled from (tests/support/matching_records.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from storage import (
    FilesystemObjectStore,
    IndexRepository,
    create_index_engine,
    migrate,
)
from tests.support.matching_records import BASIC_TEXT_SR, CT_IMAGE, matching_records
from web_viewer_api import ApiConfig, create_app

TOKEN = "qido-keys-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.production)])
def client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    folder = tmp_path_factory.mktemp("qido-keys")
    url = (request.getfixturevalue("create_postgres_database")() if request.param == "postgresql"
           else f"sqlite:///{folder / 'index.sqlite3'}")
    engine = create_index_engine(url)
    migrate(engine)
    index = IndexRepository(engine)
    index.upsert_instances(matching_records())
    yield TestClient(create_app(ApiConfig(admin_token=TOKEN), index,
                                FilesystemObjectStore(folder / "objects")))
    engine.dispose()


def _search(client: TestClient, path: str, query: str, tag: str) -> tuple[list[str], str]:
    response = client.get(f"/dicom-web/{path}?{query}", headers=AUTH)
    assert response.status_code == 200, response.text
    return sorted(item[tag]["Value"][0] for item in response.json()), response.headers.get("warning", "")


@pytest.mark.parametrize(("query", "expected"), [
    # StudyTime (TM): single value (the period it names), ranges, open ranges; within a day.
    ("StudyTime=235958-235959", ["2.25.101"]),
    ("StudyTime=235958", ["2.25.101"]),
    ("StudyTime=2359", ["2.25.101"]),
    ("StudyTime=-0900", ["2.25.102"]),
    ("StudyTime=1010-", ["2.25.101", "2.25.104"]),
    ("StudyTime=101010.12", ["2.25.104"]),
    ("StudyTime=101010.123457-", ["2.25.101"]),
    ("StudyTime=0830", ["2.25.102"]),
    ("StudyTime=000000-235959", ["2.25.101", "2.25.102", "2.25.104"]),
    ("StudyTime=*", ["2.25.101", "2.25.102", "2.25.103", "2.25.104"]),
    ("StudyTime=", ["2.25.101", "2.25.102", "2.25.103", "2.25.104"]),
    # StudyDate with StudyTime: each matched apart (PS3.4 C.2.2.2.5, no combined negotiation).
    ("StudyDate=20240110-20240111&StudyTime=0800-0900", ["2.25.102"]),
    ("StudyDate=20240110&StudyTime=2300-", ["2.25.101"]),
    ("StudyDate=-20240111", ["2.25.101", "2.25.102"]),
    # StudyID (SH): single value, case-sensitive, wildcards.
    ("StudyID=CT100", ["2.25.101"]),
    ("StudyID=CT1*", ["2.25.101", "2.25.104"]),
    ("StudyID=?R200", ["2.25.102"]),
    ("StudyID=ct100", []),
    # ReferringPhysicianName (PN): as PatientName, case-insensitive, wildcards, fuzzy.
    ("ReferringPhysicianName=SMITH^JOHN", ["2.25.101"]),
    ("ReferringPhysicianName=martin^claire", ["2.25.102"]),
    ("ReferringPhysicianName=SM*", ["2.25.101", "2.25.104"]),
    ("ReferringPhysicianName=claire&fuzzymatching=true", ["2.25.102"]),
    ("ReferringPhysicianName=jo%20sm&fuzzymatching=true", ["2.25.101", "2.25.104"]),
    ("ReferringPhysicianName=claire", []),
    # The keys matched before, with the same forms.
    ("AccessionNumber=ACC*", ["2.25.101", "2.25.102", "2.25.104"]),
    ("PatientID=PAT3", ["2.25.103"]),
    ("PatientName=doe*", ["2.25.101", "2.25.104"]),
    ("PatientName=john&fuzzymatching=true", ["2.25.104"]),
    ("StudyInstanceUID=2.25.101,2.25.103", ["2.25.101", "2.25.103"]),
    ("StudyInstanceUID=2.25.102\\2.25.104", ["2.25.102", "2.25.104"]),
    ("ModalitiesInStudy=SR", ["2.25.101"]),
    ("00200010=MR200", ["2.25.102"]),
])
def test_every_required_study_key_matches(client: TestClient, query: str, expected: list[str]) -> None:
    found, warning = _search(client, "studies", query, "0020000D")
    assert found == expected
    assert "ignored" not in warning


@pytest.mark.parametrize(("query", "expected"), [
    ("PerformedProcedureStepStartDate=20240110", ["2.25.101.1"]),
    ("PerformedProcedureStepStartDate=20240111-", ["2.25.101.2", "2.25.102.1"]),
    ("PerformedProcedureStepStartDate=-20240110", ["2.25.101.1"]),
    ("PerformedProcedureStepStartDate=20230101-20231231", []),
    ("PerformedProcedureStepStartTime=235958", ["2.25.101.1"]),
    ("PerformedProcedureStepStartTime=0830", ["2.25.102.1"]),
    ("PerformedProcedureStepStartTime=-0100", ["2.25.101.2"]),
    ("PerformedProcedureStepStartTime=0800-2359", ["2.25.101.1", "2.25.102.1"]),
    ("00400244=20240111&00400245=08", ["2.25.102.1"]),
    ("RequestAttributesSequence.ScheduledProcedureStepID=SPS2", ["2.25.101.1"]),
    ("RequestAttributesSequence.ScheduledProcedureStepID=SPS?", ["2.25.101.1"]),
    ("RequestAttributesSequence.ScheduledProcedureStepID=SPS3", []),
    ("RequestAttributesSequence.ScheduledProcedureStepID=SPS", []),
    ("00400275.00401001=RP1", ["2.25.101.1"]),
    ("RequestAttributesSequence.RequestedProcedureID=*2", ["2.25.101.1"]),
    ("Modality=S?", ["2.25.101.2"]),
    ("SeriesNumber=2", ["2.25.101.2"]),
    ("SeriesInstanceUID=2.25.101.2,2.25.103.1", ["2.25.101.2", "2.25.103.1"]),
])
def test_every_required_series_key_matches(client: TestClient, query: str, expected: list[str]) -> None:
    found, warning = _search(client, "series", query, "0020000E")
    assert found == expected
    assert "ignored" not in warning
    in_study, _warning = _search(client, "studies/2.25.101/series", query, "0020000E")
    assert in_study == [uid for uid in expected if uid.startswith("2.25.101.")]


def test_series_answers_carry_the_procedure_step_start(client: TestClient) -> None:
    response = client.get("/dicom-web/studies/2.25.102/series", headers=AUTH)
    [series] = response.json()
    assert series["00400244"] == {"vr": "DA", "Value": ["20240111"]}
    assert series["00400245"] == {"vr": "TM", "Value": ["083000.25"]}


@pytest.mark.parametrize(("query", "expected"), [
    (f"SOPClassUID={CT_IMAGE}", ["2.25.101.1.1", "2.25.101.1.2"]),
    (f"SOPClassUID={CT_IMAGE},{BASIC_TEXT_SR}", ["2.25.101.1.1", "2.25.101.1.2", "2.25.101.2.1"]),
    (f"SOPClassUID={BASIC_TEXT_SR}", ["2.25.101.2.1"]),
    ("SOPInstanceUID=2.25.101.1.2\\2.25.101.2.1", ["2.25.101.1.2", "2.25.101.2.1"]),
    ("InstanceNumber=2", ["2.25.101.1.2"]),
    ("InstanceNumber=1&SOPClassUID=1.2.840.10008.5.1.4.1.1.2", ["2.25.101.1.1"]),
])
def test_every_required_instance_key_matches(client: TestClient, query: str, expected: list[str]) -> None:
    found, warning = _search(client, "studies/2.25.101/instances", query, "00080018")
    assert found == expected
    assert "ignored" not in warning


@pytest.mark.parametrize(("path", "query", "key"), [
    ("studies", "StudyDescription=CT*", "StudyDescription"),
    ("studies", "PatientBirthDate=19700101", "PatientBirthDate"),
    ("series", "SeriesDescription=X", "SeriesDescription"),
    ("series", "RequestAttributesSequence.AccessionNumber=ACC1", "RequestAttributesSequence.AccessionNumber"),
    ("studies/2.25.101/instances", "ContentDate=20240110", "ContentDate"),
])
def test_only_an_optional_key_is_ignored_with_a_warning(client: TestClient, path: str, query: str,
                                                        key: str) -> None:
    response = client.get(f"/dicom-web/{path}?{query}", headers=AUTH)
    assert response.status_code == 200
    assert "ignored" in response.headers["warning"] and key in response.headers["warning"]
    assert response.json()  # not matched: nothing is filtered out


@pytest.mark.parametrize(("path", "query"), [
    ("studies", "StudyTime=2300-0100"),  # across midnight (PS3.4 C.2.2.2.5)
    ("studies", "StudyTime=23*"),  # no wildcard in a time
    ("studies", "StudyTime=2460"),
    ("studies", "StudyDate=2024*"),
    ("series", "PerformedProcedureStepStartTime=1:00"),
    ("series", "PerformedProcedureStepStartDate=20241301"),
    ("series", "SeriesNumber=1*"),
    ("studies/2.25.101/instances", "SOPClassUID=1.2.840.*"),
])
def test_a_value_the_keys_vr_does_not_allow_is_a_400(client: TestClient, path: str, query: str) -> None:
    response = client.get(f"/dicom-web/{path}?{query}", headers=AUTH)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"
