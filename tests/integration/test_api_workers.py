"""`dicom-gateway api` with HTTP__WORKERS=2: two processes answer on one port with the
settings the command line gave (data directory, port), /metrics counts the requests of
both whichever answers the scrape, and SIGTERM stops them all."""

from __future__ import annotations

import re
import signal
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.services import (
    GatewayProcess,
    child_pids,
    free_port,
    gateway_command,
    gateway_env,
    http_json,
    wait_for,
)

TOKEN = "workers-test-token-0123456789abcdef"



def _index_with_one_study(data_dir: Path) -> str:
    from gateway.sample_study import SampleStudySpec, build_sample_study
    from storage import IndexRepository, InstanceRecord, create_index_engine, migrate

    data_dir.mkdir(parents=True)
    engine = create_index_engine(f"sqlite:///{data_dir / 'index.sqlite3'}")
    migrate(engine)
    [dataset] = build_sample_study(SampleStudySpec(ct_slices=1, mr_slices=0, ct_size=8))
    IndexRepository(engine).upsert_instance(InstanceRecord.from_dataset(
        dataset, object_key="studies/x.dcm", size_bytes=1, sha256="0" * 64,
        transfer_syntax_uid="1.2.840.10008.1.2.1", site_id="site1"))
    engine.dispose()
    return str(dataset.StudyInstanceUID)


def test_two_api_processes_share_the_port_and_stop_together(tmp_path: Path) -> None:
    study = _index_with_one_study(tmp_path / "data")
    port = free_port()
    # The data directory and port come from the command line only: the worker processes
    # must inherit them, not fall back to the defaults.
    env = gateway_env(tmp_path / "elsewhere", admin_token=TOKEN, http__workers="2",
                      pseudonym_secret="workers-test-secret-0123456789abcdef")
    del env["DICOM_GATEWAY_DATA_DIR"]
    command = gateway_command("api", "--data-dir", str(tmp_path / "data"), "--http-port", str(port))
    with GatewayProcess(command, env, tmp_path / "api.log") as api:
        wait_for(lambda: http_json(f"http://127.0.0.1:{port}/livez")[0] == 200 or not api.alive(),
                 timeout=90, what="the API")
        assert api.alive(), api.log_text()
        assert api.process is not None
        workers = wait_for(lambda: [pid for pid in child_pids(api.process.pid)
                                    if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
                           if len(child_pids(api.process.pid)) >= 2 else None,
                           timeout=60, what="two worker processes")
        assert len(workers) == 2, workers
        for _ in range(20):  # whichever process answers, it reads the command line's index
            status, body, _ = http_json(f"http://127.0.0.1:{port}/dicom-web/studies", token=TOKEN)
            assert status == 200 and [s["0020000D"]["Value"][0] for s in body] == [study]
        counted = re.compile(r'^dicom_gateway_http_requests_total\{method="GET",'
                             r'route="/dicom-web/studies",status="200"\} (\S+)$', re.MULTILINE)
        for _ in range(8):  # new connections: the scrapes land on either process
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as scrape:
                text = scrape.read().decode()
            assert [float(v) for v in counted.findall(text)] == [20.0], text[-2000:]
        assert api.stop(signal.SIGTERM, timeout=60) == 0, api.log_text()
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def test_an_inherited_prometheus_folder_does_not_reach_a_single_api_process(tmp_path: Path) -> None:
    """PROMETHEUS_MULTIPROC_DIR left in the environment (a shell, a unit file) pointing
    nowhere: one API process still counts its requests in memory and serves /metrics."""
    _index_with_one_study(tmp_path / "data")
    port = free_port()
    env = gateway_env(tmp_path / "data", admin_token=TOKEN,
                      pseudonym_secret="workers-test-secret-0123456789abcdef")
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "no-such-folder")
    command = gateway_command("api", "--http-port", str(port))
    with GatewayProcess(command, env, tmp_path / "api.log") as api:
        wait_for(lambda: http_json(f"http://127.0.0.1:{port}/livez")[0] == 200 or not api.alive(),
                 timeout=90, what="the API")
        for _ in range(3):
            assert http_json(f"http://127.0.0.1:{port}/dicom-web/studies", token=TOKEN)[0] == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as scrape:
            text = scrape.read().decode()
        assert 'route="/dicom-web/studies",status="200"} 3.0' in text
        assert "FileNotFoundError" not in api.log_text()


def test_api_processes_ignore_a_clients_forwarded_for_and_count_failures_together(
        tmp_path: Path) -> None:
    """Two `dicom-gateway api` processes, no proxy listed: uvicorn does not take
    X-Forwarded-For from a loopback peer on its own, so spoofed addresses all count against
    127.0.0.1, whichever process answers (the count goes through the audit trail); the
    admin token is still served. With 127.0.0.1 listed in HTTP__TRUSTED_PROXIES, the
    forwarded address is the one audited."""
    import json

    _index_with_one_study(tmp_path / "data")
    port = free_port()
    env = gateway_env(tmp_path / "data", admin_token=TOKEN, http__workers="2",
                      auth__failure_limit="4", pseudonym_secret="workers-test-secret-0123456789abcdef")
    base = f"http://127.0.0.1:{port}"

    def attempt(forwarded_for: str) -> int:
        request = urllib.request.Request(f"{base}/dicom-web/studies", headers={
            "Authorization": "Bearer guess", "X-Forwarded-For": forwarded_for})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def audited() -> list[dict[str, object]]:
        status, body, _ = http_json(f"{base}/api/audit?action=auth.invalid_token&limit=100",
                                    token=TOKEN, accept="application/json")
        assert status == 200
        return list(body["events"])

    with GatewayProcess(gateway_command("api", "--http-port", str(port)), env,
                        tmp_path / "api.log") as api:
        wait_for(lambda: http_json(f"{base}/livez")[0] == 200 or not api.alive(),
                 timeout=90, what="the API")
        assert api.alive(), api.log_text()
        statuses = []
        for n in range(8):  # a new connection each: either process answers
            statuses.append(attempt(f"198.51.100.{n}"))
            # the other process counts what the audit trail holds (written within ~50 ms)
            wait_for(lambda n=n: len(audited()) == n + 1, timeout=10, what="the failure audited")
        assert statuses == [401] * 4 + [429] * 4
        assert {event["network_access_point_id"] for event in audited()} == {"127.0.0.1"}
        for _ in range(4):
            assert http_json(f"{base}/dicom-web/studies", token=TOKEN)[0] == 200
        assert api.stop(signal.SIGTERM, timeout=60) == 0, api.log_text()

    env = gateway_env(tmp_path / "data", admin_token=TOKEN, http__trusted_proxies=json.dumps(["127.0.0.1"]),
                      pseudonym_secret="workers-test-secret-0123456789abcdef")
    with GatewayProcess(gateway_command("api", "--http-port", str(port)), env,
                        tmp_path / "api-proxied.log") as api:
        wait_for(lambda: http_json(f"{base}/livez")[0] == 200 or not api.alive(),
                 timeout=90, what="the API")
        assert attempt("203.0.113.50") == 401
        wait_for(lambda: any(e["network_access_point_id"] == "203.0.113.50" for e in audited()),
                 timeout=10, what="the forwarded address audited")
