"""SIGKILL of the API while a STOW-RS upload streams in (through `serve`): the client gets a
clear transport error, nothing half-received is handed to the worker, the supervisor
restarts the API, and the retried upload is stored and indexed exactly once."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx

from gateway.sample_study import SampleStudySpec, write_sample_study
from tests.support.services import GatewayProcess, free_port, gateway_command, gateway_env, http_json, wait_for


def _children(parent: int) -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_api_killed_mid_upload_loses_nothing_and_the_retry_is_stored_once(tmp_path: Path) -> None:
    files = sorted(write_sample_study(tmp_path / "study", SampleStudySpec(ct_slices=3, mr_slices=0, seed=808)))
    data_dir = tmp_path / "data"
    dicom_port, http_port = free_port(), free_port()
    command = gateway_command("serve", "--data-dir", str(data_dir), "--dicom-port", str(dicom_port),
                              "--http-port", str(http_port))
    with GatewayProcess(command, gateway_env(data_dir), tmp_path / "serve.log") as serve:
        wait_for(lambda: "dicom-gateway is ready" in serve.log_text() or not serve.alive(), timeout=120,
                 what="serve")
        assert serve.alive(), serve.log_text()
        token = json.loads((data_dir / "secrets.json").read_text())["admin_token"]
        [api_pid] = [pid for pid, cmd in _children(serve.process.pid).items() if "gateway api" in cmd]
        boundary = "killed-upload"
        parts = [(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), p.read_bytes())
                 for p in files]
        killed = threading.Event()

        def body() -> Iterator[bytes]:
            head, first = parts[0]
            yield head + first[: len(first) // 2]
            killed.wait(timeout=60)  # the rest would come after the crash
            yield first[len(first) // 2:]

        outcome: dict[str, object] = {}

        def upload() -> None:
            try:
                outcome["response"] = httpx.post(
                    f"http://127.0.0.1:{http_port}/dicom-web/studies", content=body(), timeout=60,
                    headers={"Authorization": f"Bearer {token}", "Accept": "application/dicom+json",
                             "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
            except httpx.TransportError as exc:
                outcome["error"] = exc

        sender = threading.Thread(target=upload)
        sender.start()
        incoming = data_dir / "spool" / ".incoming"
        wait_for(lambda: any(incoming.glob(".stow-*.part")), timeout=30, what="the upload to reach the API")
        os.kill(api_pid, signal.SIGKILL)
        killed.set()
        sender.join(timeout=60)
        assert "error" in outcome, outcome  # a clear transport error, not a fake success
        assert not list((data_dir / "spool").glob("site1/*/*.dcm"))  # nothing half-received handed over
        wait_for(lambda: http_json(f"http://127.0.0.1:{http_port}/healthz")[0] == 200, timeout=120,
                 interval=0.5, what="the supervisor to restart the API")
        whole = b"".join(head + data + b"\r\n" for head, data in parts) + f"--{boundary}--\r\n".encode()
        retry = httpx.post(f"http://127.0.0.1:{http_port}/dicom-web/studies", content=whole, timeout=60,
                           headers={"Authorization": f"Bearer {token}", "Accept": "application/dicom+json",
                                    "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        assert retry.status_code == 202, retry.text

        def indexed() -> int:
            status, found, _ = http_json(f"http://127.0.0.1:{http_port}/dicom-web/instances", token=token)
            return len(found) if status == 200 and found else 0

        wait_for(lambda: indexed() == len(files), timeout=120, interval=0.5, what="the retried instances indexed")
        assert indexed() == len(files)
