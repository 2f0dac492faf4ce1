"""DIMSE callers have credentials (docs/admin/security/dimse.md): each calling AE sees and
retrieves only its sites' studies, needs a right per service, is answered about storage
commitment only for its own site's instances, and leaves one audit event per operation —
with de-identified study UIDs only. Driven by dcmtk (findscu, getscu, movescu, storescu,
storescp) against a node over a real two-site index."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from sqlalchemy import update

from anonymize import PseudonymKeys
from dicom_node import (
    CallerCredential,
    CallerPolicy,
    DicomNode,
    MoveDestination,
    NodeConfig,
    Right,
)
from gateway.components import archived_as
from storage import AuditEntry, AuditQuery, InstanceQuery, StudyQuery
from storage.index.models import Instance, Study
from tests.support.commitment import commitment_request, request_commitment
from tests.support.dicomweb_server import TOKEN, DicomwebServer
from tests.support.services import free_port, wait_for
from tests.support.storescp import running_storescp

SITE_A, SITE_B = "site1", "siteB"


@pytest.fixture(scope="module", params=[
    "sqlite", pytest.param("postgresql", marks=pytest.mark.production)])
def archive(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomwebServer]:
    """Three de-identified studies in one index (SQLite, then PostgreSQL): two of site A,
    one of site B; the API (for /api/audit) runs on the same index."""
    database_url = (request.getfixturevalue("create_postgres_database")()
                    if request.param == "postgresql" else None)
    server = DicomwebServer(tmp_path_factory.mktemp("two-sites"), studies=3,
                            database_url=database_url)
    studies = server.index.search_studies(StudyQuery())
    site_b = min(s.study_instance_uid for s in studies if s.number_of_instances != 6)
    with server.index.engine.begin() as connection:
        connection.execute(update(Study).values(site_id=SITE_A))
        connection.execute(update(Study).where(Study.study_instance_uid == site_b)
                           .values(site_id=SITE_B))
        connection.execute(update(Instance).where(Instance.study_instance_uid == site_b)
                           .values(site_id=SITE_B))
    with server:
        yield server


def _site_studies(archive: DicomwebServer, site: str | None = None) -> set[str]:
    with archive.index.engine.connect() as connection:
        rows = connection.execute(Study.__table__.select()).all()
    return {r.study_instance_uid for r in rows if site is None or r.site_id == site}


@pytest.fixture(scope="module")
def destination_port() -> int:
    return free_port()


POLICY = CallerPolicy.build(["127.0.0.0/8"], callers={
    "PACS_A": CallerCredential(frozenset({SITE_A}), frozenset(Right)),
    "PACS_B": CallerCredential(frozenset({SITE_B}), frozenset({Right.FIND, Right.COMMIT})),
    "REGION": CallerCredential(None, frozenset({Right.FIND, Right.MOVE})),
    "STORE_ONLY": CallerCredential(frozenset({SITE_A}), frozenset({Right.STORE})),
})


@pytest.fixture(scope="module")
def node(archive: DicomwebServer, destination_port: int,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomNode]:
    config = NodeConfig(
        ae_title="DICOMGATEWAY", host="127.0.0.1", port=free_port(), site_id=SITE_A,
        spool_root=tmp_path_factory.mktemp("spool"), policy=POLICY, batch_size=0,
        calling_ae_sites={"PACS_B": SITE_B, "MODALITY_B": SITE_B},
        move_destinations={"STORESCP": MoveDestination("STORESCP", "127.0.0.1", destination_port),
                           "DOWN": MoveDestination("DOWN", "127.0.0.1", free_port())})
    running = DicomNode(config, lambda site, batch: None, archive.index, archive.store,
                        archived_as(archive.index, PseudonymKeys(b"w" * 32)),
                        pseudonymize_uid=PseudonymKeys(b"w" * 32).uid)
    running.start()
    yield running
    running.stop()


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool, *args], check=False, capture_output=True, text=True, timeout=120)


def _find(dcmtk: dict[str, str], node: DicomNode, out: Path, calling: str) -> set[str]:
    out.mkdir(parents=True)
    result = _run(dcmtk["findscu"], "-S", "-aet", calling, "-aec", "DICOMGATEWAY", "-X",
                  "-od", str(out), "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=",
                  "127.0.0.1", str(node.port))
    assert result.returncode == 0, result.stderr
    return {str(pydicom.dcmread(p).StudyInstanceUID) for p in out.glob("rsp*.dcm")}


def _get(dcmtk: dict[str, str], node: DicomNode, out: Path, calling: str,
         study: str) -> subprocess.CompletedProcess[str]:
    out.mkdir(parents=True)
    return _run(dcmtk["getscu"], "-v", "-S", "-aet", calling, "-aec", "DICOMGATEWAY",
                "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(node.port))


def _events(node: DicomNode, archive: DicomwebServer, action: str, actor: str) -> list[AuditEntry]:
    assert node.audit.writer is not None
    node.audit.writer.flush()
    return archive.access.search_audit(AuditQuery(actions=(action,), actor=actor, limit=1000))


def _original_uids(archive: DicomwebServer) -> set[str]:
    """Every UID of the instances as the modality sent them (before de-identification)."""
    found: set[str] = set()
    for path in (Path(archive.store.root).parent / "source").rglob("*.dcm"):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        found |= {str(header.StudyInstanceUID), str(header.SeriesInstanceUID),
                  str(header.SOPInstanceUID)}
    return found


def _assert_no_original_uid(events: list[AuditEntry], originals: set[str]) -> None:
    text = json.dumps([e.__dict__ for e in events], default=str)
    assert not [uid for uid in originals if uid in text]


def test_find_lists_only_the_callers_sites_studies(dcmtk: dict[str, str], node: DicomNode,
                                                   archive: DicomwebServer, tmp_path: Path) -> None:
    site_a, site_b = _site_studies(archive, SITE_A), _site_studies(archive, SITE_B)
    assert len(site_a) == 2 and len(site_b) == 1
    assert _find(dcmtk, node, tmp_path / "a", "PACS_A") == site_a
    assert _find(dcmtk, node, tmp_path / "b", "PACS_B") == site_b
    assert _find(dcmtk, node, tmp_path / "region", "REGION") == site_a | site_b
    # Unlisted callers: the site their C-STOREs are filed under, nothing else.
    assert _find(dcmtk, node, tmp_path / "unlisted", "SOME_AE") == site_a
    assert _find(dcmtk, node, tmp_path / "unlisted-b", "MODALITY_B") == site_b
    # One event per study found, under its de-identified UID: a site's admin sees them.
    events = _events(node, archive, "dimse.find", "ae:PACS_A")
    assert {e.study_instance_uid for e in events} == site_a
    assert all(e.address == "127.0.0.1" and e.outcome == 0 and e.event_code == "110112"
               and e.status_code == 0 and json.loads(e.detail)["matches"] == 2 for e in events)
    region = _events(node, archive, "dimse.find", "ae:REGION")
    assert {e.study_instance_uid for e in region} == site_a | site_b
    _assert_no_original_uid(events + region, _original_uids(archive))


def test_series_level_find_of_another_sites_study_matches_nothing(
        dcmtk: dict[str, str], node: DicomNode, archive: DicomwebServer, tmp_path: Path) -> None:
    [study_b] = _site_studies(archive, SITE_B)
    for calling, expected in (("PACS_A", 0), ("PACS_B", 2)):
        out = tmp_path / calling
        out.mkdir()
        result = _run(dcmtk["findscu"], "-S", "-aet", calling, "-aec", "DICOMGATEWAY", "-X",
                      "-od", str(out), "-k", "QueryRetrieveLevel=SERIES",
                      "-k", f"StudyInstanceUID={study_b}", "-k", "SeriesInstanceUID=",
                      "127.0.0.1", str(node.port))
        assert result.returncode == 0, result.stderr
        assert len(list(out.glob("rsp*.dcm"))) == expected, calling


def test_get_of_another_sites_study_retrieves_nothing(dcmtk: dict[str, str], node: DicomNode,
                                                      archive: DicomwebServer, tmp_path: Path) -> None:
    [study_b] = _site_studies(archive, SITE_B)
    study_a = min(_site_studies(archive, SITE_A))
    refused = _get(dcmtk, node, tmp_path / "b", "PACS_A", study_b)
    assert refused.returncode == 0, refused.stderr
    assert list((tmp_path / "b").iterdir()) == []
    # the same answer as for a study that does not exist: no site learns what another holds
    assert "Number of Completed Suboperations : 0" in refused.stderr
    assert "Number of Failed Suboperations    : 0" in refused.stderr
    own = _get(dcmtk, node, tmp_path / "a", "PACS_A", study_a)
    assert own.returncode == 0, own.stderr
    expected = archive.index.search_instances(InstanceQuery(study_instance_uid=study_a))
    assert len(list((tmp_path / "a").iterdir())) == len(expected) > 0
    events = _events(node, archive, "dimse.get", "ae:PACS_A")
    by_study = {e.study_instance_uid: e for e in events}
    assert by_study[study_a].outcome == 0 and by_study[study_a].event_code == "110104"
    assert json.loads(by_study[study_a].detail)["instances"] == len(expected)
    assert any(json.loads(e.detail)["instances"] == 0 and not e.study_instance_uid for e in events)
    _assert_no_original_uid(events, _original_uids(archive))


def test_get_by_a_caller_without_the_get_right_is_refused(
        dcmtk: dict[str, str], node: DicomNode, archive: DicomwebServer, tmp_path: Path) -> None:
    study_a = min(_site_studies(archive, SITE_A))
    for calling in ("STORE_ONLY", "PACS_B", "REGION"):
        result = _get(dcmtk, node, tmp_path / calling, calling, study_a)
        # 0x0124 Refused: Not authorized (dcmtk does not name this general status)
        assert "C-GET Response (Unknown Status: 0x124)" in result.stderr, calling
        assert list((tmp_path / calling).iterdir()) == []
        [event] = _events(node, archive, "dimse.get", f"ae:{calling}")
        assert event.outcome == 4 and event.status_code == 0x0124
    find = _run(dcmtk["findscu"], "-v", "-S", "-aet", "STORE_ONLY", "-aec", "DICOMGATEWAY",
                "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=",
                "127.0.0.1", str(node.port))
    assert "Unknown Status: 0x124" in find.stderr


@pytest.fixture
def storescp(dcmtk: dict[str, str], destination_port: int, tmp_path: Path) -> Iterator[Path]:
    with running_storescp(dcmtk["storescp"], destination_port, tmp_path / "received") as out:
        yield out


def _move(dcmtk: dict[str, str], node: DicomNode, calling: str,
          study: str) -> subprocess.CompletedProcess[str]:
    return _run(dcmtk["movescu"], "-v", "-S", "-aet", calling, "-aec", "DICOMGATEWAY",
                "-aem", "STORESCP", "-k", "QueryRetrieveLevel=STUDY",
                "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(node.port))


def test_move_obeys_site_scope_and_the_move_right(dcmtk: dict[str, str], node: DicomNode,
                                                  archive: DicomwebServer, storescp: Path) -> None:
    [study_b] = _site_studies(archive, SITE_B)
    outside = _move(dcmtk, node, "PACS_A", study_b)
    assert outside.returncode == 0 and "Final Move Response (Success)" in outside.stderr
    assert list(storescp.iterdir()) == []
    no_right = _move(dcmtk, node, "PACS_B", study_b)
    assert "Refused: MoveDestinationUnknown" in no_right.stdout + no_right.stderr
    allowed = _move(dcmtk, node, "REGION", study_b)
    assert allowed.returncode == 0, allowed.stderr
    count = len(archive.index.search_instances(InstanceQuery(study_instance_uid=study_b)))
    wait_for(lambda: len(list(storescp.iterdir())) == count, timeout=30, what="B's study moved")
    [region] = [e for e in _events(node, archive, "dimse.move", "ae:REGION")
                if json.loads(e.detail)["destination_ae"] == "STORESCP"]
    assert region.study_instance_uid == study_b and region.outcome == 0
    assert json.loads(region.detail)["destination_ae"] == "STORESCP"
    [refused] = _events(node, archive, "dimse.move", "ae:PACS_B")
    assert refused.outcome == 4 and refused.status_code == 0xA801
    assert json.loads(refused.detail)["reason"] == "not authorized"


def _commit(port: int, calling: str, references: list[tuple[str, str]]) -> Dataset:
    return request_commitment(port, commitment_request(references), calling)[1]


def _outcome(report: Dataset) -> tuple[set[str], dict[str, int]]:
    return ({str(i.ReferencedSOPInstanceUID) for i in report.get("ReferencedSOPSequence", [])},
            {str(i.ReferencedSOPInstanceUID): int(i.FailureReason)
             for i in report.get("FailedSOPSequence", [])})


def test_commitment_answers_only_about_the_callers_own_sites_instances(
        dcmtk: dict[str, str], node: DicomNode, archive: DicomwebServer,
        sample_study: tuple[Path, object], tmp_path: Path) -> None:
    # Spooled: what MODALITY_B (filed under site B) just sent (new instances: not archived).
    files = []
    for number, path in enumerate(sorted(sample_study[0].rglob("*.dcm"))[:2]):
        dataset = pydicom.dcmread(path)
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        files.append(tmp_path / f"{number}.dcm")
        dataset.save_as(files[-1])
    sent = _run(dcmtk["storescu"], "-aet", "MODALITY_B", "-aec", "DICOMGATEWAY", "127.0.0.1",
                str(node.port), *map(str, files))
    assert sent.returncode == 0, sent.stderr
    spooled = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    spooled_refs = [(str(h.SOPClassUID), str(h.SOPInstanceUID)) for h in spooled]
    # Archived: original UIDs of site A's and site B's indexed instances.
    by_site: dict[str, list[tuple[str, str]]] = {SITE_A: [], SITE_B: []}
    keys = PseudonymKeys(b"w" * 32)
    site_b = _site_studies(archive, SITE_B)
    for path in (Path(archive.store.root).parent / "source").rglob("*.dcm"):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        study = keys.uid(str(header.StudyInstanceUID))
        by_site[SITE_B if study in site_b else SITE_A].append(
            (str(header.SOPClassUID), str(header.SOPInstanceUID)))
    archived_a, archived_b = by_site[SITE_A][:2], by_site[SITE_B][:2]
    assert archived_a and archived_b
    everything = spooled_refs + archived_a + archived_b
    for calling, expected in (("MODALITY_B", spooled_refs + archived_b),
                              ("PACS_B", spooled_refs + archived_b),
                              ("PACS_A", archived_a), ("SOME_AE", archived_a)):
        committed, failed = _outcome(_commit(node.port, calling, everything))
        assert committed == {uid for _, uid in expected}, calling
        assert failed == {uid: 0x0112 for _, uid in everything if (_, uid) not in expected}, calling
    refused = _commit_status(node.port, "STORE_ONLY")
    assert refused == 0x0124
    events = _events(node, archive, "dimse.commit", "ae:PACS_A")
    assert events and json.loads(events[0].detail)["committed"] == len(archived_a)
    assert events[0].outcome == 4  # some failed
    stores = _events(node, archive, "dimse.store", "ae:MODALITY_B")
    assert len(stores) == 1 and stores[0].outcome == 0 and stores[0].event_code == "110107"
    # the study under the UID the worker will give it, never the one the modality sent
    assert stores[0].study_instance_uid == keys.uid(str(spooled[0].StudyInstanceUID))
    detail = json.loads(stores[0].detail)
    assert detail["site"] == SITE_B and detail["association"]["instances"] == 2
    assert detail["association"]["refused"] == 0 and detail["association"]["outcome"] == "released"
    originals = _original_uids(archive) | {
        str(getattr(h, k)) for h in spooled
        for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
    _assert_no_original_uid(_events(node, archive, "dimse.commit", "ae:PACS_B") + stores, originals)


def _commit_status(port: int, calling: str) -> int:
    ae = AE(ae_title=calling)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGATEWAY")
    request = Dataset()
    request.TransactionUID = generate_uid()
    request.ReferencedSOPSequence = Sequence([])
    try:
        status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
        return int(status.Status)
    finally:
        assoc.release()


def test_store_without_the_store_right_is_refused_and_audited(
        dcmtk: dict[str, str], node: DicomNode, archive: DicomwebServer,
        sample_study: tuple[Path, object]) -> None:
    files = sorted(sample_study[0].rglob("*.dcm"))[:2]
    refused = _run(dcmtk["storescu"], "-v", "-aet", "REGION", "-aec", "DICOMGATEWAY", "127.0.0.1",
                   str(node.port), *map(str, files))
    # 0x0124 Refused: Not authorized; storescu stops sending at the first refusal
    assert refused.stderr.count("Store Response (Unknown Status: 0x124)") == 1
    [event] = _events(node, archive, "dimse.store", "ae:REGION")
    detail = json.loads(event.detail)
    assert event.outcome == 4 and event.status_code == 0x0124
    assert detail["association"]["instances"] == 0 and detail["association"]["refused"] == 1
    assert not node.spools.holds(str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID))


def test_api_audit_lists_the_dimse_events(dcmtk: dict[str, str], node: DicomNode,
                                          archive: DicomwebServer, tmp_path: Path) -> None:
    _find(dcmtk, node, tmp_path / "find", "PACS_B")
    assert node.audit.writer is not None
    node.audit.writer.flush()
    answer = httpx.get(f"{archive.root}/api/audit", params={"actor": "ae:PACS_B", "action": "dimse.find"},
                       headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200, answer.text
    [event, *_] = answer.json()["events"]
    assert event["action"] == "dimse.find" and event["network_access_point_id"] == "127.0.0.1"
    assert event["event_id"] == {"code": "110112", "scheme": "DCM", "meaning": "Query"}
    assert event["study_instance_uid"] == next(iter(_site_studies(archive, SITE_B)))


def test_move_with_an_identifier_it_cannot_answer_fails_and_is_audited_without_its_values(
        dcmtk: dict[str, str], node: DicomNode, archive: DicomwebServer) -> None:
    result = _run(dcmtk["movescu"], "-v", "-S", "-aet", "PACS_A", "-aec", "DICOMGATEWAY",
                  "-aem", "STORESCP", "-k", "QueryRetrieveLevel=DUPONT^JEAN",
                  "-k", "StudyInstanceUID=1.2.3", "127.0.0.1", str(node.port))
    assert "Final Move Response (Failed: UnableToProcess)" in result.stderr
    [event] = [e for e in _events(node, archive, "dimse.move", "ae:PACS_A")
               if json.loads(e.detail)["status"] == "0xC513"]
    assert event.outcome == 4 and "DUPONT" not in event.detail and "1.2.3" not in event.detail


def test_move_to_a_destination_that_does_not_answer_is_audited_as_refused(
        dcmtk: dict[str, str], node: DicomNode, archive: DicomwebServer) -> None:
    [study_b] = _site_studies(archive, SITE_B)
    result = _run(dcmtk["movescu"], "-v", "-S", "-aet", "REGION", "-aec", "DICOMGATEWAY",
                  "-aem", "DOWN", "-k", "QueryRetrieveLevel=STUDY",
                  "-k", f"StudyInstanceUID={study_b}", "127.0.0.1", str(node.port))
    assert "Refused: MoveDestinationUnknown" in result.stderr
    [event] = [e for e in _events(node, archive, "dimse.move", "ae:REGION")
               if json.loads(e.detail)["destination_ae"] == "DOWN"]
    assert event.status_code == 0xA801 and event.outcome == 4
    assert json.loads(event.detail)["reason"] == "destination unreachable"
    assert event.study_instance_uid == study_b



def test_qido_and_c_find_answer_one_caller_the_same_studies(
        archive: DicomwebServer, node: DicomNode, dcmtk: dict[str, str], tmp_path: Path) -> None:
    """One query/retrieve service, one policy: an API key and a calling AE limited to the
    same sites find the same studies, whichever protocol they use."""
    import datetime as dt

    from storage import ApiKeyRecord
    from access import new_api_key, sha256_hex

    def qido(sites: frozenset[str] | None) -> set[str]:
        key_id, key = new_api_key()
        archive.access.add_api_key(ApiKeyRecord(key_id, "same-policy", frozenset({"read"}), sites,
                                                dt.datetime.now(dt.UTC), None, sha256_hex(key)))
        found = httpx.get(f"{archive.url}/studies", timeout=30, headers={
            "Authorization": f"Bearer {key}", "Accept": "application/dicom+json"})
        assert found.status_code == 200, found.text
        return {s["0020000D"]["Value"][0] for s in found.json()}

    for calling, sites in (("PACS_A", frozenset({SITE_A})), ("PACS_B", frozenset({SITE_B})),
                           ("REGION", None)):
        by_dimse = _find(dcmtk, node, tmp_path / calling, calling)
        assert by_dimse == qido(sites) == _site_studies(archive, None if sites is None
                                                        else next(iter(sites)))


def test_commitment_follows_who_stored_the_instance_not_who_owns_its_study(
        node: DicomNode, archive: DicomwebServer) -> None:
    """An instance site B wrote into one of A's studies (a write-back) is B's: B's caller
    is told it is committed, A's is not."""
    keys = PseudonymKeys(b"w" * 32)
    site_a_studies = _site_studies(archive, SITE_A)
    for path in sorted((Path(archive.store.root).parent / "source").rglob("*.dcm")):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        if keys.uid(str(header.StudyInstanceUID)) in site_a_studies:
            break
    reference = (str(header.SOPClassUID), str(header.SOPInstanceUID))
    archived = keys.uid(reference[1])
    with archive.index.engine.begin() as connection:
        connection.execute(update(Instance).where(Instance.sop_instance_uid == archived)
                           .values(site_id=SITE_B))
    try:
        assert _outcome(_commit(node.port, "PACS_B", [reference])) == ({reference[1]}, {})
        assert _outcome(_commit(node.port, "PACS_A", [reference])) == (set(), {reference[1]: 0x0112})
    finally:
        with archive.index.engine.begin() as connection:
            connection.execute(update(Instance).where(Instance.sop_instance_uid == archived)
                               .values(site_id=SITE_A))
