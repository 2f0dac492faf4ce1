"""One study from dcmtk's storescu to a QIDO-RS answer, through real processes.

Embedded column: `dicom-gateway serve` (SQLite, filesystem objects, filesystem broker).
Production column: separate `node`, `worker` and `api` processes on Redis, PostgreSQL and
a real S3 server (SeaweedFS).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import pydicom
from botocore.config import Config

from gateway.sample_study import SampleStudySpec
from tests.support.seaweedfs import SeaweedFS
from tests.support.services import (
    GatewayProcess,
    free_port,
    gateway_command,
    gateway_env,
    http_json,
    wait_for,
)
from tests.support.webhook import webhook_receiver
from worker import verify

SECRET = "e2e-pseudonym-secret-0123456789abcdef"
TOKEN = "e2e-admin-token-0123456789abcdef"


def _original_identifiers(folder: Path) -> list[str]:
    values: set[str] = set()
    for path in folder.glob("*.dcm"):
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        values |= {str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID),
                   str(dataset.SOPInstanceUID)}
    return sorted(values)


def _assert_no_phi(blobs: list[bytes], folder: Path, spec: SampleStudySpec) -> None:
    forbidden = [*spec.identity.strings(), *_original_identifiers(folder)]
    assert blobs
    for blob in blobs:
        for value in forbidden:
            assert value.encode() not in blob, f"identifying value {value!r} reached storage"


def _storescu(dcmtk: dict[str, str], port: int, folder: Path) -> None:
    result = subprocess.run([dcmtk["storescu"], "-aec", "DICOMGATEWAY", "+sd", "+r",
                             "127.0.0.1", str(port), str(folder)], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")


def _echo(dcmtk: dict[str, str], port: int) -> bool:
    result = subprocess.run([dcmtk["echoscu"], "-aec", "DICOMGATEWAY", "127.0.0.1", str(port)],
                            capture_output=True, timeout=30)
    return result.returncode == 0


def _wait_for_study(http_port: int, token: str, expected_instances: int) -> dict[str, object]:
    url = f"http://127.0.0.1:{http_port}/dicom-web/studies"

    def indexed() -> dict[str, object] | None:
        status, body, _ = http_json(url, token)
        assert status == 200, body
        if body and body[0]["00201208"]["Value"][0] == expected_instances:
            return dict(body[0])
        return None

    return wait_for(indexed, timeout=120, interval=0.1, what="the study to be indexed")


def _port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@contextmanager
def _serve(tmp_path: Path, data_dir: Path, dicom_port: int, http_port: int,
           **settings: str) -> Iterator[GatewayProcess]:
    """`dicom-gateway serve` on the given ports, yielded once it printed its banner."""
    command = gateway_command("serve", "--data-dir", str(data_dir), "--dicom-port",
                              str(dicom_port), "--http-port", str(http_port))
    with GatewayProcess(command, gateway_env(data_dir, **settings), tmp_path / "serve.log") as serve:
        wait_for(lambda: "dicom-gateway is ready" in serve.log_text() or not serve.alive(),
                 timeout=120, what="serve to be ready")
        assert serve.alive(), serve.log_text()
        yield serve


def test_serve_ingests_a_study_sent_by_storescu(
    tmp_path: Path, dcmtk: dict[str, str], sample_study: tuple[Path, SampleStudySpec],
) -> None:
    folder, spec = sample_study
    data_dir = tmp_path / "data"
    dicom_port, http_port = free_port(), free_port()
    with webhook_receiver() as receiver, _serve(
        tmp_path, data_dir, dicom_port, http_port, worker__study_quiet_seconds="1",
        worker__webhooks=json.dumps([{"url": receiver.url, "secret": "e2e-hook-secret-0123"}]),
    ) as serve:
        banner = serve.log_text()
        token = json.loads((data_dir / "secrets.json").read_text())["admin_token"]
        assert f"Admin token   : {token}" in banner
        assert f"DICOMGATEWAY@127.0.0.1:{dicom_port}" in banner

        assert _echo(dcmtk, dicom_port)
        _storescu(dcmtk, dicom_port, folder)
        study = _wait_for_study(http_port, token, spec.ct_slices + spec.mr_slices)
        assert study["00080061"]["Value"] == ["CT", "MR"]  # type: ignore[index]
        assert study["00201206"]["Value"] == [2]  # type: ignore[index]

        # The completion step, once the study is quiet: manifest, thumbnails, signed event.
        wait_for(lambda: receiver.events, timeout=60, what="the study.stored webhook")
        headers, body = receiver.events[0]
        assert verify("e2e-hook-secret-0123", body, headers["x-dicomgateway-signature"])
        study_uid = study["0020000D"]["Value"][0]  # type: ignore[index]
        assert json.loads(body)["study_instance_uid"] == study_uid
        study_dir = data_dir / "objects" / "studies" / str(study_uid)
        assert (study_dir / "manifest-kos.dcm").is_file()
        assert len(list(study_dir.glob("series/*/thumbnail.png"))) == 2
        assert len(list(study_dir.glob("series/*/metadata.json"))) == 2

        objects = sorted((data_dir / "objects").rglob("*.dcm"))
        objects = [p for p in objects if p.name != "manifest-kos.dcm"]
        assert len(objects) == spec.ct_slices + spec.mr_slices
        _assert_no_phi([p.read_bytes() for p in objects], folder, spec)
        assert not list((data_dir / "spool").rglob("*.dcm"))  # spool deleted after storing

        status, body, _ = http_json(f"http://127.0.0.1:{http_port}/dicom-web/studies")
        assert status == 401 and body["error"]["code"] == "unauthorized"
        status, body, _ = http_json(f"http://127.0.0.1:{http_port}/healthz")
        assert status == 200 and body["components"] == {
            "index": "ok", "object_store": "ok", "node": "ok", "worker": "ok", "broker": "ok"}

        assert serve.stop(signal.SIGINT, timeout=60) == 0  # one Ctrl-C stops everything
        assert _port_closed(dicom_port) and _port_closed(http_port)
        assert not list((data_dir / "run").glob("*.ready"))


def test_production_column_redis_postgresql_seaweedfs(
    tmp_path: Path, dcmtk: dict[str, str], sample_study: tuple[Path, SampleStudySpec],
    seaweedfs: SeaweedFS, s3_bucket: str, redis_url: str,
    create_postgres_database: Callable[[], str],
) -> None:
    folder, spec = sample_study
    data_dir = tmp_path / "site-data"
    dicom_port, http_port = free_port(), free_port()
    env = gateway_env(
        data_dir,
        site_id="hopital-a",
        pseudonym_secret=SECRET,
        admin_token=TOKEN,
        broker_url=redis_url,
        broker_transport_options=json.dumps({"global_keyprefix": f"dgw-{uuid.uuid4().hex}:"}),
        database_url=create_postgres_database(),
        object_store__backend="s3",
        object_store__s3__endpoint_url=seaweedfs.endpoint_url,
        object_store__s3__bucket=s3_bucket,
        object_store__s3__region=seaweedfs.region,
        object_store__s3__access_key_id=seaweedfs.access_key,
        object_store__s3__secret_access_key=seaweedfs.secret_key,
        dicom__port=str(dicom_port),
        http__port=str(http_port),
    )
    with (
        GatewayProcess(gateway_command("api"), env, tmp_path / "api.log") as api,
        GatewayProcess(gateway_command("worker", "--concurrency", "2"), env,
                       tmp_path / "worker.log") as worker,
        GatewayProcess(gateway_command("node"), env, tmp_path / "node.log") as node,
    ):
        wait_for(lambda: http_json(f"http://127.0.0.1:{http_port}/healthz")[0] == 200,
                 timeout=90, what=f"the API to be healthy\n{api.log_text()}")
        wait_for(lambda: (data_dir / "run" / "worker.ready").exists(), timeout=90,
                 what="the Celery worker to be ready")
        wait_for(lambda: _echo(dcmtk, dicom_port), timeout=60, what="the node to answer C-ECHO")

        _storescu(dcmtk, dicom_port, folder)
        study = _wait_for_study(http_port, TOKEN, spec.ct_slices + spec.mr_slices)
        study_uid = study["0020000D"]["Value"][0]  # type: ignore[index]
        assert str(study_uid).startswith("2.25.")

        client = boto3.client(
            "s3", endpoint_url=seaweedfs.endpoint_url, region_name=seaweedfs.region,
            aws_access_key_id=seaweedfs.access_key, aws_secret_access_key=seaweedfs.secret_key,
            config=Config(s3={"addressing_style": "path"}))
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
        assert len([k for k in keys if k.endswith(".dcm")]) == spec.ct_slices + spec.mr_slices
        assert all(k.startswith(f"studies/{study_uid}/series/") for k in keys
                   if k != f"studies/{study_uid}/owner.json")
        assert f"studies/{study_uid}/owner.json" in keys
        blobs = [client.get_object(Bucket=s3_bucket, Key=k)["Body"].read() for k in keys]
        _assert_no_phi(blobs, folder, spec)
        for process in (node, worker, api):
            assert process.alive(), process.log_text()
        for log in (node.log_text(), worker.log_text()):
            for value in spec.identity.strings():
                assert value not in log, f"PHI {value!r} in a log"


def test_instances_acknowledged_while_the_broker_is_down_are_not_lost(
    tmp_path: Path, dcmtk: dict[str, str], sample_study: tuple[Path, SampleStudySpec],
) -> None:
    """Broker unreachable at enqueue time, node then killed: the batch was never handed over
    (no record), and the worker's recovery loop sends it at its first pass."""
    folder, spec = sample_study
    data_dir = tmp_path / "data"
    dicom_port, http_port = free_port(), free_port()
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    env = gateway_env(data_dir, broker_url=dead_broker, dicom__port=str(dicom_port))
    with GatewayProcess(gateway_command("node"), env, tmp_path / "node.log") as node:
        wait_for(lambda: _echo(dcmtk, dicom_port), timeout=60, what="the node to answer C-ECHO")
        _storescu(dcmtk, dicom_port, folder)  # every instance acknowledged
        wait_for(lambda: "the workers will send it again" in node.log_text(), timeout=60,
                 what="the failed enqueue to be reported")
        node.stop(signal.SIGKILL)
    assert len(list((data_dir / "spool").rglob("*.dcm"))) == spec.ct_slices + spec.mr_slices

    with _serve(tmp_path, data_dir, dicom_port, http_port):
        token = json.loads((data_dir / "secrets.json").read_text())["admin_token"]
        _wait_for_study(http_port, token, spec.ct_slices + spec.mr_slices)
        wait_for(lambda: not list((data_dir / "spool").rglob("*.dcm")), timeout=30,
                 what="the spool to be emptied")


def test_share_flow_through_serve_never_logs_tokens_or_pins(
    tmp_path: Path, dcmtk: dict[str, str], sample_study: tuple[Path, SampleStudySpec],
) -> None:
    """The producing site finds its study by the RIS accession number, shares it with a PIN,
    the recipient opens it; DEBUG logs of every component hold no token and no PIN."""
    import httpx

    folder, spec = sample_study
    data_dir = tmp_path / "data"
    dicom_port, http_port = free_port(), free_port()
    with _serve(tmp_path, data_dir, dicom_port, http_port, log_level="DEBUG") as serve:
        token = json.loads((data_dir / "secrets.json").read_text())["admin_token"]
        _storescu(dcmtk, dicom_port, folder)
        _wait_for_study(http_port, token, spec.ct_slices + spec.mr_slices)
        base = f"http://127.0.0.1:{http_port}"
        admin = {"Authorization": f"Bearer {token}"}
        found = httpx.post(f"{base}/api/site/lookup", headers=admin,
                           json={"accession_number": spec.identity.accession_number}).json()
        assert len(found["study_uids"]) == 1
        created = httpx.post(f"{base}/api/shares", headers=admin, json={
            "study_uids": found["study_uids"], "expires_in": 3600, "pin": "864209"}).json()
        share = f"{base}/s/{created['token']}"
        assert httpx.post(f"{share}/session", data={"pin": "000111"}).status_code == 401
        opened = httpx.post(f"{share}/session", data={"pin": "864209"})
        assert opened.status_code == 303
        with httpx.Client(cookies={"dgw_share_session": opened.cookies["dgw_share_session"]}) as browser:
            studies = browser.get(f"{share}/dicom-web/studies",
                                  headers={"Accept": "application/dicom+json"}).json()
            assert [s["0020000D"]["Value"][0] for s in studies] == found["study_uids"]
        log = serve.log_text()
        assert "DEBUG" in log or "INFO" in log
        for secret in (created["token"], "864209", "000111", opened.cookies["dgw_share_session"]):
            assert secret not in log
        assert log.count(token) == 1  # the banner prints it once, per the contract; never again
        assert spec.identity.accession_number not in log


def test_node_killed_mid_association_loses_no_acknowledged_instance(
    tmp_path: Path, dcmtk: dict[str, str],
) -> None:
    """SIGKILL the node while storescu is sending: every instance that got Success is
    indexed (the node's claim on its batch died with it: the worker's recovery loop sends
    the batch), and storescu's retry of the whole study completes it."""
    import re
    import signal as signals

    from anonymize import PseudonymKeys
    from gateway.sample_study import SampleStudySpec, write_sample_study

    source = tmp_path / "study"
    files = sorted(write_sample_study(source, SampleStudySpec(ct_slices=120, mr_slices=0, seed=404)))
    originals = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    data_dir = tmp_path / "data"
    dicom_port, http_port = free_port(), free_port()
    with _serve(tmp_path, data_dir, dicom_port, http_port, dicom__batch_size="0") as serve:
        secrets = json.loads((data_dir / "secrets.json").read_text())
        node_pid = int((data_dir / "run" / "node.ready").read_text())
        sender = subprocess.Popen([dcmtk["storescu"], "-v", "-aec", "DICOMGATEWAY", "127.0.0.1",
                                   str(dicom_port), *map(str, files)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        spool = data_dir / "spool"
        wait_for(lambda: len(list(spool.rglob("*.dcm"))) >= 30, timeout=60, what="30 spooled instances")
        os.kill(node_pid, signals.SIGKILL)
        output, _ = sender.communicate(timeout=60)
        assert sender.returncode != 0  # the association died under it
        acknowledged = len(re.findall(r"Received Store Response \(Success\)", output))
        # 30 were on disk; the last of them may have been killed before its Success went out
        assert 29 <= acknowledged < len(files)
        keys = PseudonymKeys(secrets["pseudonym_secret"].encode())
        token = secrets["admin_token"]

        def indexed(count: int) -> bool:
            wanted = [keys.uid(uid) for uid in originals[:count]]
            status, body, _ = http_json(
                f"http://127.0.0.1:{http_port}/dicom-web/instances?limit=1000", token=token)
            return status == 200 and set(wanted) <= {i["00080018"]["Value"][0] for i in body}

        # the node's claim on the batch died with it: the worker's recovery loop sends it
        wait_for(lambda: indexed(acknowledged), timeout=180, interval=0.5,
                 what="every acknowledged instance indexed after the crash")
        # (indexed before the node is back: the worker's loop did not wait for it)
        wait_for(lambda: _echo(dcmtk, dicom_port), timeout=60,
                 what="the supervisor to restart the node")
        retry = subprocess.run([dcmtk["storescu"], "-aec", "DICOMGATEWAY", "127.0.0.1",
                                str(dicom_port), *map(str, files)], capture_output=True, timeout=300)
        assert retry.returncode == 0, retry.stderr
        wait_for(lambda: indexed(len(files)), timeout=300, interval=0.5, what="the whole study indexed")
        assert "node exited" in serve.log_text() or "restarting" in serve.log_text()


def test_storage_commitment_through_serve_covers_archived_instances(
    tmp_path: Path, dcmtk: dict[str, str], sample_study: tuple[Path, SampleStudySpec],
) -> None:
    """Once the worker has archived a study (spool emptied), the node still commits its
    instances: it finds their pseudonymized UIDs in the index."""
    from tests.support.commitment import commitment_request, request_commitment

    folder, spec = sample_study
    data_dir = tmp_path / "data"
    dicom_port, http_port = free_port(), free_port()
    with _serve(tmp_path, data_dir, dicom_port, http_port):
        token = json.loads((data_dir / "secrets.json").read_text())["admin_token"]
        _storescu(dcmtk, dicom_port, folder)
        _wait_for_study(http_port, token, spec.ct_slices + spec.mr_slices)
        wait_for(lambda: not list((data_dir / "spool").rglob("*.dcm")), timeout=60, what="spool emptied")
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.rglob("*.dcm"))]
        request = commitment_request([(str(h.SOPClassUID), str(h.SOPInstanceUID)) for h in headers])
        event_type, report = request_commitment(dicom_port, request)
    assert event_type == 1 and "FailedSOPSequence" not in report
    assert len(report.ReferencedSOPSequence) == len(headers)


def test_serve_answers_find_and_get_from_loopback_and_audits_every_dimse_operation(
    tmp_path: Path, dcmtk: dict[str, str], sample_study: tuple[Path, SampleStudySpec],
) -> None:
    """The README's "Try it": with no DICOM__CALLERS, findscu and getscu from loopback
    (unlisted callers: every right, on the node's own site) see and retrieve the study.
    Each operation is in /api/audit under the caller's AE title, naming the de-identified
    study (the C-STORE one too: the keyed UID the worker gave it), never an original UID."""
    from tests.support.commitment import commitment_request, request_commitment

    folder, spec = sample_study
    data_dir = tmp_path / "data"
    dicom_port, http_port = free_port(), free_port()
    with _serve(tmp_path, data_dir, dicom_port, http_port):
        token = json.loads((data_dir / "secrets.json").read_text())["admin_token"]
        _storescu(dcmtk, dicom_port, folder)
        study = _wait_for_study(http_port, token, spec.ct_slices + spec.mr_slices)
        study_uid = str(study["0020000D"]["Value"][0])  # type: ignore[index]
        found = tmp_path / "found"
        found.mkdir()
        result = subprocess.run([dcmtk["findscu"], "-S", "-aet", "FINDSCU", "-aec", "DICOMGATEWAY",
                                 "-X", "-od", str(found), "-k", "QueryRetrieveLevel=STUDY",
                                 "-k", "StudyInstanceUID=", "127.0.0.1", str(dicom_port)],
                                capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert [pydicom.dcmread(p).StudyInstanceUID for p in found.glob("rsp*.dcm")] == [study_uid]
        got = tmp_path / "got"
        got.mkdir()
        result = subprocess.run([dcmtk["getscu"], "-S", "-aet", "GETSCU", "-aec", "DICOMGATEWAY",
                                 "-od", str(got), "-k", "QueryRetrieveLevel=STUDY",
                                 "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(dicom_port)],
                                capture_output=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert len(list(got.iterdir())) == spec.ct_slices + spec.mr_slices
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.rglob("*.dcm"))]
        request_commitment(dicom_port, commitment_request([(str(h.SOPClassUID), str(h.SOPInstanceUID)) for h in headers[:2]]))

        def audited() -> list[dict[str, object]] | None:
            status, body, _ = http_json(f"http://127.0.0.1:{http_port}/api/audit?limit=1000", token)
            assert status == 200, body
            events = [e for e in body["events"] if str(e["action"]).startswith("dimse.")]
            actions = {e["action"] for e in events}
            return events if {"dimse.store", "dimse.find", "dimse.get", "dimse.commit"} <= actions else None

        events = wait_for(audited, timeout=30, what="the DIMSE audit events")
    by_action = {str(e["action"]): e for e in events}
    assert by_action["dimse.store"]["study_instance_uid"] == study_uid
    assert by_action["dimse.store"]["user_id"] == "ae:STORESCU"
    assert by_action["dimse.find"]["user_id"] == "ae:FINDSCU"
    assert by_action["dimse.get"]["study_instance_uid"] == study_uid
    assert all(e["network_access_point_id"] == "127.0.0.1" and e["event_outcome_indicator"] == 0
               for e in events)
    text = json.dumps(events)
    assert not [uid for uid in _original_identifiers(folder) if uid in text]


def test_no_log_line_at_any_level_carries_planted_phi(
    tmp_path: Path, dcmtk: dict[str, str], sample_study: tuple[Path, SampleStudySpec],
) -> None:
    """A full ingest (C-STORE, worker, completion, DICOMweb reads) with every component at
    DEBUG: no planted identifying value appears in any log line."""
    folder, spec = sample_study
    data_dir = tmp_path / "data"
    dicom_port, http_port = free_port(), free_port()
    with _serve(tmp_path, data_dir, dicom_port, http_port, log_level="DEBUG",
                worker__study_quiet_seconds="1") as serve:
        token = json.loads((data_dir / "secrets.json").read_text())["admin_token"]
        _storescu(dcmtk, dicom_port, folder)
        study = _wait_for_study(http_port, token, spec.ct_slices + spec.mr_slices)
        study_uid = study["0020000D"]["Value"][0]  # type: ignore[index]
        wait_for(lambda: list((data_dir / "objects" / "studies" / str(study_uid)).glob("manifest-kos.dcm")),
                 timeout=60, what="the completion step")
        http_json(f"http://127.0.0.1:{http_port}/dicom-web/studies/{study_uid}/metadata", token=token)
        log = serve.log_text()
    assert "DEBUG" in log and len(log.splitlines()) > 50
    leaks = [value for value in [*spec.identity.strings(), *_original_identifiers(folder)]
             if value in log]
    assert leaks == [], f"planted PHI or original UIDs in the logs: {leaks[:5]}"
