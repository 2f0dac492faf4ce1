"""A region with two producing sites, every component in its own process (issue 10).

Sites A and B each run their own `dicom-gateway node` and `dicom-gateway worker` (own data
directory and spool), both write to one Redis, one PostgreSQL database and one S3 server
(SeaweedFS), and two `dicom-gateway api` processes serve the region — all started as the
units and example settings of `deploy/` start them (`tests/support/cluster.py`).

One patient (one INS) is imaged at A and at B under two local patient IDs. The tests run
in order on one cluster: the last ones kill a worker and read every log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest

from gateway.sample_study import PlantedIdentity, SampleStudySpec, write_sample_study
from tests.support.cluster import Cluster
from tests.support.orthanc import Orthanc
from tests.support.seaweedfs import SeaweedFS
from tests.support.services import wait_for

pytestmark = pytest.mark.production

INS = "284076322011986"
IDENTITY_A = PlantedIdentity(
    patient_id="IPP-A-4711", issuer_of_patient_id="HOPITAL-A", accession_number="ACCA20261120",
    institution="HOPITAL A SAINT-LOUIS", station="CTHOPA01", device_serial="SN-A-7788", ins=INS)
IDENTITY_B = PlantedIdentity(
    patient_id="DOS-B-0815", issuer_of_patient_id="CABINET-B", accession_number="ACCB20261121",
    institution="CABINET RADIOLOGIE B", station="MRCABB02", device_serial="SN-B-9911",
    study_date="20261121", ins=INS)
PIN = "482913"


@dataclass(frozen=True)
class Study:
    """A generated study: where it is, who sends it, what it becomes."""

    folder: Path
    site: str
    identity: PlantedIdentity
    instances: int
    original_uids: frozenset[str]
    uid: str = ""  # de-identified Study Instance UID

    @classmethod
    def write(cls, folder: Path, site: str, identity: PlantedIdentity, seed: int, ct: int,
              mr: int) -> Study:
        paths = write_sample_study(folder, SampleStudySpec(
            ct_slices=ct, mr_slices=mr, ct_size=128, mr_size=64, seed=seed, identity=identity))
        uids = set()
        for path in paths:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
            uids |= {str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID),
                     str(dataset.SOPInstanceUID)}
        return cls(folder, site, identity, len(paths), frozenset(uids))

    def original_study_uid(self) -> str:
        return str(pydicom.dcmread(next(self.folder.glob("*.dcm")), stop_before_pixels=True)
                   .StudyInstanceUID)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, seaweedfs: SeaweedFS,
            dcmtk: dict[str, str]) -> Iterator[Cluster]:
    # A short quiet period, so the completion step (KOS manifest) runs within the test.
    with Cluster(tmp_path_factory.mktemp("cluster"), sites=("A", "B"), apis=2,
                 seaweedfs=seaweedfs, settings={"worker__study_quiet_seconds": "1"}) as running:
        yield running


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory, cluster: Cluster) -> dict[str, Study]:
    """The first study at A and at B, sent and indexed; two more written, not yet sent."""
    root = tmp_path_factory.mktemp("studies")
    written = {
        "A1": Study.write(root / "A1", "A", IDENTITY_A, seed=11, ct=4, mr=2),
        "B1": Study.write(root / "B1", "B", IDENTITY_B, seed=12, ct=4, mr=2),
        "A2": Study.write(root / "A2", "A", IDENTITY_A, seed=13, ct=4, mr=1),
        "B2": Study.write(root / "B2", "B", IDENTITY_B, seed=14, ct=2, mr=1),
    }
    result = {name: dataclasses.replace(s, uid=cluster.study_uid(s.original_study_uid()))
              for name, s in written.items()}
    for name in ("A1", "B1"):
        cluster.send(result[name].site, result[name].folder)
    for name in ("A1", "B1"):
        cluster.wait_indexed(result[name].instances, study=result[name].uid)
    return result


def _qido(api_url: str, token: str, path: str, **params: str) -> list[dict[str, object]]:
    response = httpx.get(f"{api_url}/dicom-web/{path}", params=params, timeout=30,
                         headers={"Authorization": f"Bearer {token}",
                                  "Accept": "application/dicom+json"})
    assert response.status_code == 200, response.text
    return list(response.json())


def _value(item: dict[str, object], tag: str) -> object:
    return item[tag]["Value"][0]  # type: ignore[index]


def test_one_ins_at_two_sites_is_one_pseudonymous_patient_through_either_api(
        cluster: Cluster, studies: dict[str, Study]) -> None:
    pseudonym = cluster.patient_pseudonym(INS)
    assert cluster.sql("SELECT patient_id FROM patients") == [(pseudonym,)]
    for api in cluster.apis:
        found = _qido(api.url, cluster.admin_token, "studies", PatientID=pseudonym)
        assert {_value(s, "0020000D") for s in found} == {studies["A1"].uid, studies["B1"].uid}
        assert {_value(s, "00100020") for s in found} == {pseudonym}
        assert {_value(s, "00201208") for s in found} == {6}
        # the local IDs were not kept: searching by them finds nothing
        for local in (IDENTITY_A.patient_id, IDENTITY_B.patient_id):
            assert _qido(api.url, cluster.admin_token, "studies", PatientID=local) == []


def test_each_study_records_its_source_site(cluster: Cluster, studies: dict[str, Study]) -> None:
    a, b = studies["A1"], studies["B1"]
    assert dict(cluster.sql("SELECT study_instance_uid, site_id FROM studies")) == {
        a.uid: "A", b.uid: "B"}
    # What share recipients and the region see of it: nothing (the site is named in objects
    # only under Retain Institution Identity); the index and the owner record keep it.
    for study in (a, b):
        response = httpx.get(f"{cluster.apis[1].url}/dicom-web/studies/{study.uid}/metadata",
                             headers={"Authorization": f"Bearer {cluster.admin_token}"}, timeout=30)
        assert response.status_code == 200, response.text
        metadata = response.json()
        assert len(metadata) == study.instances
        assert {_value(i, "00770010") for i in metadata} == {"DICOM-GATEWAY 1"}
        assert not any("00771010" in i for i in metadata)
        owner = cluster.seaweedfs.client().get_object(  # type: ignore[union-attr]
            Bucket=cluster.bucket, Key=f"studies/{study.uid}/owner.json")["Body"].read()
        assert json.loads(owner)["site_id"] == study.site
    # And what it enforces: a key restricted to site A (made with the API's settings) sees
    # A's study only, through either API.
    key = cluster.cli("apikey", "create", "--name", "site A PACS", "--scope", "read",
                      "--site", "A").strip()
    for api in cluster.apis:
        assert [_value(s, "0020000D") for s in _qido(api.url, key, "studies")] == [a.uid]
        response = httpx.get(f"{api.url}/dicom-web/studies/{b.uid}/metadata",
                             headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert response.status_code == 404


def test_a_study_re_sent_to_another_site_is_not_taken_over(
        cluster: Cluster, studies: dict[str, Study]) -> None:
    """The "outside study imported at B" workflow: B's node receives A's study. Nothing
    changes: A owns it, its objects stay byte-identical, B's key still cannot read it."""
    a = studies["A1"]

    def objects() -> dict[str, str]:
        client = cluster.seaweedfs.client()  # type: ignore[union-attr]
        return {key: hashlib.sha256(client.get_object(Bucket=cluster.bucket, Key=key)["Body"]
                                    .read()).hexdigest()
                for key in cluster.s3_keys(f"studies/{a.uid}/series/") if key.endswith(".dcm")}

    before = objects()
    assert len(before) == a.instances
    cluster.send("B", a.folder)
    wait_for(lambda: cluster.sites["B"].spooled() == 0, timeout=120,
             what="site B's worker to process the re-sent study")
    assert cluster.sites["B"].quarantined() == 0  # the same instances: no conflict
    assert objects() == before
    assert cluster.sql("SELECT site_id FROM studies WHERE study_instance_uid = :uid", uid=a.uid) == [("A",)]
    assert set(cluster.sql("SELECT site_id FROM instances WHERE study_instance_uid = :uid",
                           uid=a.uid)) == {("A",)}
    key_b = cluster.cli("apikey", "create", "--name", "site B PACS", "--scope", "read",
                        "--site", "B").strip()
    key_a = cluster.cli("apikey", "create", "--name", "site A viewer", "--scope", "read",
                        "--site", "A").strip()
    for api in cluster.apis:
        assert _qido(api.url, key_b, "studies", StudyInstanceUID=a.uid) == []
        assert [_value(s, "0020000D") for s in _qido(api.url, key_a, "studies",
                                                       StudyInstanceUID=a.uid)] == [a.uid]


def test_site_kos_manifest_points_at_the_regional_api(
        cluster: Cluster, studies: dict[str, Study]) -> None:
    """site.env's HTTP__PUBLIC_URL: the worker writes the regional address into the
    manifest it derives once the study is quiet (not the site host's own port 8000)."""
    study = studies["A1"]
    key = f"studies/{study.uid}/manifest-kos.dcm"
    wait_for(lambda: key in cluster.s3_keys(f"studies/{study.uid}/manifest"), timeout=60,
             what="the completion step to write the KOS manifest")
    body = cluster.seaweedfs.client().get_object(  # type: ignore[union-attr]
        Bucket=cluster.bucket, Key=key)["Body"].read()
    manifest = pydicom.dcmread(pydicom.filebase.DicomBytesIO(body))
    urls = {str(series.RetrieveURL)
            for evidence in manifest.CurrentRequestedProcedureEvidenceSequence
            for series in evidence.ReferencedSeriesSequence}
    assert urls == {f"{cluster.apis[0].url}/dicom-web/studies/{study.uid}"}


def test_share_made_through_one_api_opens_through_the_other(
        cluster: Cluster, studies: dict[str, Study]) -> None:
    """Nothing about a share or its viewer session lives in an API process."""
    api1, api2 = cluster.apis
    uids = {studies["A1"].uid, studies["B1"].uid}
    admin = {"Authorization": f"Bearer {cluster.admin_token}"}
    created = httpx.post(f"{api1.url}/api/shares", headers=admin, timeout=30,
                         json={"study_uids": sorted(uids), "expires_in": 3600, "pin": PIN})
    assert created.status_code == 201, created.text
    share = created.json()
    assert share["url"].startswith(f"{api1.url}/s/")
    path = urllib.parse.urlsplit(share["url"]).path  # what the balancer may send to API 2

    assert httpx.get(f"{api2.url}{path}", timeout=30).status_code == 200  # the PIN prompt
    root = f"{api2.url}{path}/dicom-web"
    assert httpx.get(f"{root}/studies", timeout=30).status_code in (401, 403)  # no session yet
    opened = httpx.post(f"{api1.url}{path}/session", json={"pin": PIN}, timeout=30)
    assert opened.status_code == 201, opened.text
    cookie = {"Cookie": f"dgw_share_session={opened.cookies['dgw_share_session']}"}

    page = httpx.get(f"{api2.url}{path}", headers=cookie, timeout=30)
    assert page.status_code == 200
    assert all(uid in page.text for uid in uids)  # the viewer's list of the shared studies
    found = httpx.get(f"{root}/studies", headers=cookie, timeout=30)
    assert found.status_code == 200, found.text
    assert {_value(s, "0020000D") for s in found.json()} == uids
    for uid in uids:
        series = httpx.get(f"{root}/studies/{uid}/series", headers=cookie, timeout=30).json()
        assert len(series) == 2
        metadata = httpx.get(f"{root}/studies/{uid}/series/{_value(series[0], '0020000E')}/metadata",
                             headers=cookie, timeout=30)
        assert metadata.status_code == 200 and metadata.json()
    # The share's access log, read through API 2, has the session API 1 opened.
    def logged() -> list[dict[str, object]]:
        answer = httpx.get(f"{api2.url}/api/shares/{share['id']}", headers=admin, timeout=30)
        return [e for e in answer.json()["access_log"] if e["action"] == "share.session"]

    wait_for(logged, timeout=10, what="API 1's session event in the shared audit trail")


def test_regional_pacs_pulls_both_studies_de_identified(
        cluster: Cluster, studies: dict[str, Study], tmp_path: Path) -> None:
    a, b = studies["A1"], studies["B1"]
    pseudonym = cluster.patient_pseudonym(INS)
    key = cluster.cli("apikey", "create", "--name", "CHU Nord PACS", "--scope", "read").strip()
    with Orthanc(tmp_path / "orthanc", {"region": (f"{cluster.apis[1].url}/dicom-web", key)}) as pacs:
        found = httpx.post(f"{pacs.url}/dicom-web/servers/region/qido", timeout=60,
                           json={"Uri": "/studies", "Arguments": {"PatientID": pseudonym}})
        assert found.status_code == 200, found.text
        assert a.uid in found.text and b.uid in found.text
        pulled = httpx.post(f"{pacs.url}/dicom-web/servers/region/retrieve", timeout=120,
                            json={"Resources": [{"Study": a.uid}, {"Study": b.uid}]})
        assert pulled.status_code == 200, pulled.text
        instances = httpx.get(f"{pacs.url}/instances", timeout=30).json()
        assert len(instances) == a.instances + b.instances
        assert len(httpx.get(f"{pacs.url}/patients", timeout=30).json()) == 1
        forbidden = {*IDENTITY_A.strings(), *IDENTITY_B.strings(), *a.original_uids,
                     *b.original_uids}
        for instance in instances:
            tags = httpx.get(f"{pacs.url}/instances/{instance}/simplified-tags", timeout=30).json()
            assert tags["PatientIdentityRemoved"] == "YES"
            assert tags["PatientID"] == pseudonym
            assert tags["StudyInstanceUID"] in (a.uid, b.uid)
            blob = httpx.get(f"{pacs.url}/instances/{instance}/file", timeout=30).content
            leaked = [value for value in forbidden if value.encode() in blob]
            assert not leaked, "identifying values reached the regional PACS"


def test_site_worker_down_delays_only_its_site_then_exactly_once(
        cluster: Cluster, studies: dict[str, Study]) -> None:
    a2, b2 = studies["A2"], studies["B2"]
    site_a = cluster.sites["A"]
    cluster.kill(site_a.worker)
    assert not site_a.worker.alive() and not site_a.worker.leftovers()

    cluster.send("A", a2.folder)  # A's node still acknowledges every instance...
    assert site_a.spooled() == a2.instances  # ...durably, in A's spool
    wait_for(lambda: cluster.queue_length("A") >= 1, timeout=30,
             what="A's batch to wait in A's queue")
    cluster.send("B", b2.folder)
    cluster.wait_indexed(b2.instances, study=b2.uid)  # B is not held up by A
    assert cluster.count_instances(study=a2.uid) == 0
    assert site_a.spooled() == a2.instances

    cluster.restart(site_a.worker)
    cluster.wait_indexed(a2.instances, study=a2.uid)
    wait_for(lambda: site_a.spooled() == 0, timeout=30, what="A's spool to be emptied")

    # Exactly once: one row and one object per instance, nothing quarantined.
    everything = studies.values()
    assert dict(cluster.sql("SELECT study_instance_uid, count(*) FROM instances GROUP BY 1")) == {
        s.uid: s.instances for s in everything}
    assert dict(cluster.sql("SELECT study_instance_uid, site_id FROM studies")) == {
        s.uid: s.site for s in everything}
    assert cluster.sql("SELECT count(*) FROM series") == [(2 * len(everything),)]
    assert cluster.sql("SELECT count(*) FROM patients") == [(1,)]
    for study in everything:
        objects = [k for k in cluster.s3_keys(f"studies/{study.uid}/")
                   if "/instances/" in k and k.endswith(".dcm")]
        assert len(objects) == study.instances
    [found] = _qido(cluster.apis[0].url, cluster.admin_token, "studies", StudyInstanceUID=a2.uid)
    assert _value(found, "00201208") == a2.instances
    assert all(site.quarantined() == 0 for site in cluster.sites.values())


def test_no_identifying_value_in_any_log(cluster: Cluster, studies: dict[str, Study]) -> None:
    forbidden = {*IDENTITY_A.strings(), *IDENTITY_B.strings()}
    for study in studies.values():
        forbidden |= study.original_uids
    logs = cluster.logs()
    assert set(logs) == {"node-A", "node-B", "worker-A", "worker-B", "api1", "api2"}
    for name, text in logs.items():
        assert text, f"{name} logged nothing"
        leaked = sorted(value for value in forbidden if value in text)
        assert not leaked, f"{name} logged {len(leaked)} identifying value(s)"
