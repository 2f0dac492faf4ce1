"""`dicom-gateway serve` at DEBUG receives an instance with invalid, planted values by
C-STORE: the values appear nowhere in what its processes print (stdout and stderr)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from tests.support.services import GatewayProcess, free_port, gateway_command, gateway_env, wait_for
from tests.gateway.test_library_logs import DATE_MARKER, UID_MARKER, planted_instance

TOKEN = "no-values-admin-token-0123456789abcdef"
SECRET = "no-values-pseudonym-secret-0123456789"


def test_serve_at_debug_prints_no_planted_value(tmp_path: Path, dcmtk: dict[str, str]) -> None:
    planted = planted_instance(tmp_path)
    data_dir = tmp_path / "data"
    dicom_port, http_port = free_port(), free_port()
    command = gateway_command("serve", "--data-dir", str(data_dir), "--dicom-port",
                              str(dicom_port), "--http-port", str(http_port))
    env = gateway_env(data_dir, admin_token=TOKEN, pseudonym_secret=SECRET)
    env["DICOM_GATEWAY_LOG_LEVEL"] = "DEBUG"
    with GatewayProcess(command, env, tmp_path / "serve.log") as serve:
        wait_for(lambda: "dicom-gateway is ready" in serve.log_text() or not serve.alive(),
                 timeout=120, what="serve to be ready")
        assert serve.alive(), serve.log_text()
        sent = subprocess.run([dcmtk["storescu"], "-aec", "DICOMGATEWAY", "127.0.0.1",
                               str(dicom_port), str(planted)], check=False, capture_output=True,
                              timeout=60)
        assert sent.returncode == 0, sent.stderr.decode(errors="replace")

        def stored() -> bool:
            answer = httpx.get(f"http://127.0.0.1:{http_port}/dicom-web/studies",
                               headers={"Authorization": f"Bearer {TOKEN}"})
            return answer.status_code == 200 and len(answer.json()) == 1

        wait_for(stored, timeout=120, interval=0.2, what="the planted instance to be stored")
        serve.stop()
    printed = serve.log_text()
    assert "text withheld" in printed  # pydicom did warn, in the worker
    assert UID_MARKER not in printed and DATE_MARKER not in printed
