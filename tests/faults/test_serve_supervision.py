"""`serve` owns its components: SIGKILL of the supervisor alone ends them (parent-death
signal), and a second `serve` on the same data folder refuses to start with a clear message
while the first runs, leaving the working gateway as it was (readiness files, /healthz)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx

from tests.support.services import (
    GatewayProcess,
    child_pids,
    free_port,
    gateway_command,
    gateway_env,
    wait_for,
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def _serve(data_dir: Path, dicom_port: int, http_port: int) -> list[str]:
    return gateway_command("serve", "--data-dir", str(data_dir), "--dicom-port", str(dicom_port),
                           "--http-port", str(http_port))


def _wait_ready(serve: GatewayProcess) -> None:
    wait_for(lambda: "dicom-gateway is ready" in serve.log_text() or not serve.alive(),
             timeout=120, what="the first serve")


def test_a_second_serve_refuses_and_the_first_keeps_working(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    dicom_port, http_port = free_port(), free_port()
    with GatewayProcess(_serve(data_dir, dicom_port, http_port), gateway_env(data_dir),
                        tmp_path / "first.log") as first:
        _wait_ready(first)
        assert first.alive(), first.log_text()
        ready = sorted(p.name for p in (data_dir / "run").glob("*.ready"))
        assert ready == ["node.ready", "worker.ready"]  # the API answers /healthz instead
        # Other ports: only the data folder is shared (the same ports would fail anyway).
        with GatewayProcess(_serve(data_dir, free_port(), free_port()), gateway_env(data_dir),
                            tmp_path / "second.log") as second:
            code = second.process.wait(timeout=60)  # type: ignore[union-attr]
        assert code != 0
        message = second.log_text()
        assert "already running on this data folder" in message
        assert f"pid {first.process.pid}" in message  # type: ignore[union-attr]
        assert sorted(p.name for p in (data_dir / "run").glob("*.ready")) == ready
        assert httpx.get(f"http://127.0.0.1:{http_port}/healthz").status_code == 200
        token = json.loads((data_dir / "secrets.json").read_text())["admin_token"]
        studies = httpx.get(f"http://127.0.0.1:{http_port}/dicom-web/studies",
                            headers={"Authorization": f"Bearer {token}"})
        assert studies.status_code == 200


def test_sigkill_of_the_supervisor_ends_its_components_and_a_new_serve_starts(
        tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    dicom_port, http_port = free_port(), free_port()
    with GatewayProcess(_serve(data_dir, dicom_port, http_port), gateway_env(data_dir),
                        tmp_path / "first.log") as first:
        _wait_ready(first)
        supervisor = first.process.pid  # type: ignore[union-attr]
        components = child_pids(supervisor)
        assert len(components) == 3
        os.kill(supervisor, signal.SIGKILL)  # the supervisor alone: not its components' groups
        first.process.wait(timeout=10)  # type: ignore[union-attr]
        wait_for(lambda: not any(_alive(pid) for pid in components), timeout=60,
                 what="the components to end with their supervisor")
    with GatewayProcess(_serve(data_dir, dicom_port, http_port), gateway_env(data_dir),
                        tmp_path / "again.log") as again:
        wait_for(lambda: "dicom-gateway is ready" in again.log_text() or not again.alive(),
                 timeout=120, what="a new serve on the same folder and ports")
        assert again.alive(), again.log_text()
        assert httpx.get(f"http://127.0.0.1:{http_port}/healthz").status_code == 200
