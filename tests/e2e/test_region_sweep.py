"""Nothing identifying at the region (issue 17, item 4): a sweep for planted identifiers.

A two-part deployment on one machine, embedded column: a producing site (`dicom-gateway
serve`: node, worker and a site API holding the pseudonymization secret) and a regional
`dicom-gateway api` (HTTP__ROLE=region, no secret) on the same index (SQLite) and object
store (files). Unique markers are planted as original identifiers and sent through every
path — C-STORE to the site's node, STOW-RS to the site's API, STOW-RS to the region
(refused), lookups at the site (CLI and HTTP) and at the region (refused), share creation
at the region, malformed and failing requests carrying the markers at the region — then
every file and table of the region is searched for every marker: the index (each table,
each column), the object store, the region's data directory, its log (stdout and stderr),
its /metrics. The site's own files (spool, quarantine, broker, secrets, its log) are the
site's and are not searched.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
import redis
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from gateway.sample_study import PlantedIdentity, SampleStudySpec, write_sample_study
from tests.support.cluster import Cluster
from tests.support.seaweedfs import SeaweedFS
from tests.support.services import (
    GatewayProcess,
    free_port,
    gateway_command,
    gateway_env,
    wait_for,
)

#: A UID root no real device uses: any original UID of this test starts with it.
MARKER_ROOT = "1.2.826.0.1.3680043.10.9999."
INS_ISSUER = "1.2.250.1.213.1.4.10"


@dataclass(frozen=True)
class Planted:
    """The markers of one patient, two studies."""

    tag: str
    ins: str
    identity: PlantedIdentity
    accession_stow: str
    other_patient_id: str
    uid_base: str

    @classmethod
    def new(cls) -> Planted:
        tag = secrets.token_hex(4).upper()
        number = "2" + "".join(str(secrets.randbelow(10)) for _ in range(12))
        ins = f"{number}{97 - int(number) % 97:02d}"  # INS-shaped: its key is valid
        identity = PlantedIdentity(
            patient_name=f"SWEEPNOM{tag}^MARIE", patient_id=f"IPP-SW-{tag}",
            issuer_of_patient_id=f"HOPSW{tag}", ins=ins, ins_issuer=INS_ISSUER,
            accession_number=f"ACCSW{tag}", address=f"{tag} RUE DU BALAYAGE",
            phone=f"+3314{secrets.randbelow(10**7):07d}", institution=f"HOPITAL SWEEP {tag}",
            referring_physician=f"REFSW{tag}^PAUL", operator=f"OPSW{tag}^ANNE",
            station=f"STSW{tag}", device_serial=f"SNSW{tag}")
        return cls(tag, ins, identity, f"ACCST{tag}", f"OPID{tag}",
                   f"{MARKER_ROOT}{secrets.randbelow(10**9)}")

    def markers(self) -> list[str]:
        """Every planted value, and the unkeyed forms that would confirm one."""
        who = self.identity
        values = [who.patient_name, who.patient_name.split("^")[0], who.patient_id,
                  who.issuer_of_patient_id, self.ins, who.accession_number, self.accession_stow,
                  who.address, who.phone, who.institution, who.referring_physician.split("^")[0],
                  who.operator.split("^")[0], who.station, who.device_serial,
                  self.other_patient_id, self.uid_base, MARKER_ROOT]
        hashed = [hashlib.sha256(v.encode()).hexdigest()[:16]
                  for v in (who.patient_id, self.ins, who.accession_number, self.accession_stow,
                            *(f"{self.uid_base}.{n}" for n in (1, 2, 3)))]
        return values + hashed


def _write_study(folder: Path, planted: Planted, number: int, accession: str) -> list[Path]:
    """A small study carrying the markers, original UIDs under MARKER_ROOT."""
    identity = PlantedIdentity(**{**planted.identity.__dict__, "accession_number": accession})
    paths = write_sample_study(folder, SampleStudySpec(
        ct_slices=2, mr_slices=1, ct_size=64, mr_size=64, seed=number, identity=identity))
    study_uid = f"{planted.uid_base}.{number}"
    for index, path in enumerate(sorted(paths)):
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID = study_uid
        dataset.SeriesInstanceUID = f"{study_uid}.{1 if dataset.Modality == 'CT' else 2}"
        dataset.SOPInstanceUID = f"{study_uid}.3.{index}"
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.OtherPatientIDs = planted.other_patient_id
        other = Dataset()
        other.PatientID = planted.ins
        other.IssuerOfPatientID = INS_ISSUER
        dataset.OtherPatientIDsSequence = Sequence([other])
        dataset.save_as(path, enforce_file_format=True)
    return sorted(paths)


def _multipart(files: list[Path], boundary: str = "sweep-boundary") -> tuple[bytes, dict[str, str]]:
    chunks = [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p.read_bytes()
              + b"\r\n" for p in files]
    return (b"".join(chunks) + f"--{boundary}--\r\n".encode(),
            {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
             "Accept": "application/dicom+json"})


@dataclass
class Deployment:
    site_dir: Path
    region_dir: Path
    site_url: str
    region_url: str
    dicom_port: int
    site_token: str
    region_token: str
    site: GatewayProcess
    region: GatewayProcess

    def site_auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.site_token}"}

    def region_auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.region_token}"}

    def qido(self, **params: str) -> list[dict[str, object]]:
        answer = httpx.get(f"{self.region_url}/dicom-web/studies", params=params, timeout=30,
                           headers={**self.region_auth(), "Accept": "application/dicom+json"})
        assert answer.status_code == 200, answer.text
        return list(answer.json())


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    site_dir, region_dir = tmp_path / "site", tmp_path / "region"
    dicom_port, site_port, region_port = free_port(), free_port(), free_port()
    serve = gateway_command("serve", "--data-dir", str(site_dir), "--dicom-port", str(dicom_port),
                            "--http-port", str(site_port))
    region_token = "region-" + secrets.token_urlsafe(24)
    region_env = gateway_env(
        region_dir, http__role="region", site_id="region", http__port=str(region_port),
        admin_token=region_token, log_level="DEBUG",  # the most a region would ever log
        database_url=f"sqlite:///{(site_dir / 'index.sqlite3').resolve()}",
        object_store__path=str(site_dir / "objects"))
    with GatewayProcess(serve, gateway_env(site_dir, worker__study_quiet_seconds="1"),
                        tmp_path / "site.log") as site:
        wait_for(lambda: "dicom-gateway is ready" in site.log_text() or not site.alive(),
                 timeout=120, what="the site (serve)")
        assert site.alive(), site.log_text()
        site_token = json.loads((site_dir / "secrets.json").read_text())["admin_token"]
        with GatewayProcess(gateway_command("api"), region_env, tmp_path / "region.log") as region:
            region_url = f"http://127.0.0.1:{region_port}"
            wait_for(lambda: _healthy(region_url) or not region.alive(), timeout=60,
                     what="the regional API")
            assert region.alive(), region.log_text()
            yield Deployment(site_dir, region_dir, f"http://127.0.0.1:{site_port}", region_url,
                             dicom_port, site_token, region_token, site, region)


def _send_through_every_path(env: Deployment, planted: Planted, sources: Path,
                             storescu: str) -> dict[str, str]:
    """Every path a marker can take; returns the de-identified study UIDs by path."""
    _write_study(sources / "cstore", planted, 1, planted.identity.accession_number)
    stow = _write_study(sources / "stow", planted, 2, planted.accession_stow)
    refused = _write_study(sources / "refused", planted, 3, planted.identity.accession_number)

    # C-STORE to the site's node
    result = subprocess.run([storescu, "-aec", "DICOMGATEWAY", "+sd", "+r", "127.0.0.1",
                             str(env.dicom_port), str(sources / "cstore")],
                            capture_output=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    # STOW-RS of an identified study to the site's API, the original UID in the path
    body, headers = _multipart(stow)
    answer = httpx.post(f"{env.site_url}/dicom-web/studies/{planted.uid_base}.2", content=body,
                        headers={**env.site_auth(), **headers}, timeout=60)
    assert answer.status_code == 202, answer.text
    _refused_at_the_region(env.region_url, env.region_auth(), refused)
    # both accepted studies indexed (and completed: metadata, thumbnails, KOS manifest)
    def indexed() -> list[dict[str, object]] | None:
        found = env.qido()
        return found if len(found) == 2 and all(
            s["00201208"]["Value"][0] == 3 for s in found) else None  # type: ignore[index]

    wait_for(indexed, timeout=180, interval=0.2, what="both studies indexed")
    wait_for(lambda: len(list((env.site_dir / "objects").rglob("manifest-kos.dcm"))) == 2,
             timeout=120, interval=0.2, what="both studies completed")

    # lookup at the site: the CLI, then the interface a RIS calls (identifiers in the body)
    cli = subprocess.run(gateway_command("lookup", "--accession-number", planted.accession_stow),
                         env=gateway_env(env.site_dir), capture_output=True, timeout=60, check=False)
    assert cli.returncode == 0, cli.stderr.decode(errors="replace")
    by_cli = json.loads(cli.stdout)
    assert len(by_cli["study_uids"]) == 1
    answer = httpx.post(f"{env.site_url}/api/site/lookup", headers=env.site_auth(), timeout=30,
                        json={"patient_id": planted.ins, "issuer_of_patient_id": INS_ISSUER})
    assert answer.status_code == 200, answer.text
    both = answer.json()["study_uids"]
    assert len(both) == 2 and by_cli["study_uids"][0] in both
    answer = httpx.post(f"{env.site_url}/api/site/lookup", headers=env.site_auth(), timeout=30,
                        json={"accession_number": planted.identity.accession_number})
    assert answer.status_code == 200, answer.text
    [by_accession] = answer.json()["study_uids"]
    assert by_accession != by_cli["study_uids"][0]
    assert "pseudonyms" not in answer.json()  # studies only: no oracle for candidate identifiers
    # ... and what the region can do with the study the site found
    assert [s["0020000D"]["Value"][0] for s in env.qido(StudyInstanceUID=by_accession)] == [by_accession]  # type: ignore[index]

    _region_requests(env.region_url, env.region_auth(), planted, by_accession)
    return {"cstore": by_accession, "stow": by_cli["study_uids"][0]}


def _refused_at_the_region(url: str, auth: dict[str, str], files: list[Path]) -> None:
    """STOW-RS of an identified study to the region: refused, each instance with its reason."""
    body, headers = _multipart(files)
    answer = httpx.post(f"{url}/dicom-web/studies", content=body, headers={**auth, **headers},
                        timeout=60)
    assert answer.status_code == 409, answer.text
    reasons = [item["00081197"]["Value"][0] for item in answer.json()["00081198"]["Value"]]
    assert reasons == [0xC001] * len(files)
    assert "pseudonymization domain" in answer.headers["Warning"]


def _region_requests(url: str, auth: dict[str, str], planted: Planted, stored: str) -> None:
    """Lookups (refused), share creation, and what callers send the region, right or wrong:
    the markers in bodies, paths and query strings."""
    # lookups at the region: refused, whichever way the identifiers come
    for method, lookup_path, kwargs in (
            ("GET", "/api/studies/lookup", {"params": {
                "accession_number": planted.identity.accession_number,
                "patient_id": planted.identity.patient_id}}),
            ("POST", "/api/site/lookup", {"json": {
                "accession_number": planted.identity.accession_number,
                "patient_id": planted.ins, "issuer_of_patient_id": INS_ISSUER}})):
        answer = httpx.request(method, f"{url}{lookup_path}", headers=auth,
                               timeout=30, **kwargs)  # type: ignore[arg-type]
        assert answer.status_code == 404, answer.text
        assert "computed at the producing site" in answer.json()["error"]["message"]

    # share creation at the region: of a stored study, and of an original UID (refused)
    answer = httpx.post(f"{url}/api/shares", headers=auth, timeout=30,
                        json={"study_uids": [stored], "expires_in": 3600})
    assert answer.status_code == 201, answer.text
    answer = httpx.post(f"{url}/api/shares", headers=auth, timeout=30,
                        json={"study_uids": [f"{planted.uid_base}.1"], "expires_in": 3600})
    assert 400 <= answer.status_code < 500, answer.text

    # what callers send the region, right or wrong: the markers in paths and query strings
    who = planted.identity
    original = f"{planted.uid_base}.1"
    for params in ({"PatientID": who.patient_id}, {"PatientName": who.patient_name},
                   {"AccessionNumber": who.accession_number}, {"StudyInstanceUID": original},
                   {"00100020": planted.ins, "limit": who.patient_id},
                   {who.patient_id: who.institution}, {"OtherPatientIDs": planted.other_patient_id}):
        httpx.get(f"{url}/dicom-web/studies", params=params, timeout=30,
                  headers={**auth, "Accept": "application/dicom+json"})
        httpx.get(f"{url}/dicom-web/studies", params=params, timeout=30)  # no token
    for path in (f"/dicom-web/studies/{original}/metadata", f"/dicom-web/studies/{original}/series",
                 f"/dicom-web/studies/{stored}/series/{original}.1/instances",
                 f"/api/shares/{who.patient_id}", f"/{who.patient_id}/{who.station}",
                 f"/s/{who.device_serial}/dicom-web/studies"):
        httpx.get(f"{url}{path}", headers=auth, timeout=30)
    httpx.get(f"{url}/api/audit", params={"study_uid": original, "actor": who.patient_id},
              headers=auth, timeout=30)
    httpx.post(f"{url}/dicom-web/studies/{original}", content=b"--x--",
               headers={**auth, "Content-Type": "text/plain"}, timeout=30)
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as raw:
        raw.sendall(f"GET /dicom-web/studies?PatientID={who.patient_id} HTTP/1.1\r\n"
                    f"Host: {who.institution}\r\nX-{who.station} {who.patient_name}\r\n\r\n".encode())
        raw.settimeout(10)
        raw.recv(4096)


def _index_values(database: Path) -> Iterator[tuple[str, bytes]]:
    """Every value of every column of every table, as bytes, with where it is."""
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        tables = [row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert {"studies", "instances", "audit_events"} <= set(tables), tables
        for table in tables:
            cursor = connection.execute(f'SELECT * FROM "{table}"')
            columns = [d[0] for d in cursor.description]
            for row in cursor:
                for column, value in zip(columns, row, strict=True):
                    if value is not None:
                        data = value if isinstance(value, bytes) else str(value).encode()
                        yield f"{table}.{column}", data
    finally:
        connection.close()


def test_no_planted_identifier_is_written_anywhere_at_the_region(
        deployment: Deployment, tmp_path: Path, dcmtk: dict[str, str]) -> None:
    planted = Planted.new()
    studies = _send_through_every_path(deployment, planted, tmp_path / "sources", dcmtk["storescu"])
    metrics = httpx.get(f"{deployment.region_url}/metrics", timeout=30, follow_redirects=True).text
    assert "dicom_gateway_http_requests_total" in metrics
    # the audit writer drains at shutdown: stop the region and the site, then read
    deployment.region.stop()  # uvicorn exits by the signal it handled, once shut down
    assert "Application shutdown complete" in deployment.region.log_text()
    assert deployment.site.stop() == 0

    haystacks: list[tuple[str, bytes]] = [("region /metrics", metrics.encode()),
                                          ("region log", deployment.region.log_path.read_bytes())]
    haystacks += list(_index_values(deployment.site_dir / "index.sqlite3"))
    region_files = [p for p in deployment.region_dir.rglob("*") if p.is_file()]
    store_files = [p for p in (deployment.site_dir / "objects").rglob("*") if p.is_file()]
    index_files = list(deployment.site_dir.glob("index.sqlite3*"))
    haystacks += [(str(p), p.read_bytes()) for p in region_files + store_files + index_files]
    audit_rows = [v for where, v in haystacks if where.startswith("audit_events.resource")]
    assert len(audit_rows) > 30  # the requests above were audited...
    assert any(b"(withheld)" in v for v in audit_rows)  # ...with their values withheld
    assert sum(p.name.endswith(".dcm") for p in store_files) >= 6
    assert set(studies.values()) <= {v.decode() for w, v in haystacks
                                     if w == "studies.study_instance_uid"}

    found = [(marker, where) for marker in planted.markers() for where, data in haystacks
             if marker.encode() in data or marker.upper().encode() in data.upper()]
    assert found == [], f"planted identifiers written at the region: {found[:20]}"


def _broker_values(cluster: Cluster) -> Iterator[tuple[str, bytes]]:
    """Every value under the cluster's Redis prefix; Celery message bodies decoded."""
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        for key in client.scan_iter(match=f"{cluster.key_prefix}*", count=1000):
            kind = client.type(key).decode()
            values: list[bytes] = (
                list(client.lrange(key, 0, -1)) if kind == "list"
                else [b for pair in client.hgetall(key).items() for b in pair] if kind == "hash"
                else list(client.smembers(key)) if kind == "set"
                else list(client.zrange(key, 0, -1)) if kind == "zset"
                else [client.get(key) or b""] if kind == "string" else [])
            for value in values:
                yield f"redis {key.decode()}", value
                try:
                    message = json.loads(value)
                    body = message["body"] if isinstance(message, dict) else None
                except (ValueError, KeyError):
                    continue
                if isinstance(body, str):
                    yield f"redis {key.decode()} body", base64.b64decode(body)
    finally:
        client.close()


@pytest.mark.production
def test_no_planted_identifier_reaches_the_production_region(
        tmp_path: Path, seaweedfs: SeaweedFS, dcmtk: dict[str, str]) -> None:
    """The production column: site A's node and worker, the regional API (as deploy/ starts
    it: HTTP__ROLE=region, no secret) on PostgreSQL, Redis and S3. The worker starts only
    after the broker's messages for the C-STORE were read, so that they are searched too."""
    planted = Planted.new()
    _write_study(tmp_path / "cstore", planted, 1, planted.identity.accession_number)
    refused = _write_study(tmp_path / "refused", planted, 3, planted.identity.accession_number)
    with Cluster(tmp_path / "cluster", sites=("A",), apis=1, seaweedfs=seaweedfs,
                 start_workers=False, settings={"worker__study_quiet_seconds": "1"},
                 api_settings={"LOG_LEVEL": "DEBUG"}) as cluster:
        region = cluster.apis[0]
        assert region.env["DICOM_GATEWAY_HTTP__ROLE"] == "region"
        assert "DICOM_GATEWAY_PSEUDONYM_SECRET" not in region.env
        auth = {"Authorization": f"Bearer {cluster.admin_token}"}
        cluster.send("A", tmp_path / "cstore")
        wait_for(lambda: cluster.queue_length("A") > 0, timeout=30, what="the ingest message")
        queued = list(_broker_values(cluster))
        assert any(where.endswith("body") for where, _ in queued), "no ingest message queued"
        cluster.restart(cluster.sites["A"].worker)
        cluster.wait_indexed(3)
        wait_for(lambda: any(k.endswith("manifest-kos.dcm") for k in cluster.s3_keys()),
                 timeout=120, interval=0.2, what="the study completed")
        _refused_at_the_region(region.url, auth, refused)

        site = cluster.sites["A"]
        lookup = subprocess.run(
            [*site.node.unit.program(), "lookup", "--accession-number",
             planted.identity.accession_number], env=site.env, capture_output=True,
            timeout=60, check=False)
        assert lookup.returncode == 0, lookup.stderr.decode(errors="replace")
        [stored] = json.loads(lookup.stdout)["study_uids"]
        assert [s for (s,) in cluster.sql("SELECT study_instance_uid FROM studies")] == [stored]
        _region_requests(region.url, auth, planted, stored)
        metrics = httpx.get(f"{region.url}/metrics", timeout=30, follow_redirects=True).text
        assert "dicom_gateway_http_requests_total" in metrics
        cluster.stop(region.process)  # the audit writer drains at shutdown

        haystacks: list[tuple[str, bytes]] = [("region /metrics", metrics.encode()),
                                              ("region log", region.process.log_path.read_bytes())]
        haystacks += queued + list(_broker_values(cluster))
        tables = [t for (t,) in cluster.sql(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]
        assert {"studies", "instances", "audit_events"} <= set(tables)
        for table in tables:
            for row in cluster.sql(f'SELECT * FROM "{table}"'):  # names from the catalogue
                haystacks += [(table, v if isinstance(v, bytes) else str(v).encode())
                              for v in row if v is not None]
        client = seaweedfs.client()
        keys = cluster.s3_keys()
        assert sum(k.endswith(".dcm") for k in keys) >= 4  # 3 instances and the KOS manifest
        haystacks += [(f"s3 {k}", client.get_object(Bucket=cluster.bucket, Key=k)["Body"].read())
                      for k in keys]
        haystacks += [(str(p), p.read_bytes()) for p in region.data_dir.rglob("*") if p.is_file()]
        audited = [v for where, v in haystacks if where == "audit_events"]
        assert any(b"(withheld)" in v for v in audited)

        found = [(marker, where) for marker in planted.markers() for where, data in haystacks
                 if marker.encode() in data or marker.upper().encode() in data.upper()]
        assert found == [], f"planted identifiers written at the region: {found[:20]}"
