"""The regional hospital's case: Orthanc (Debian's orthanc + orthanc-dicomweb), configured
with our DICOMweb root in `DicomWeb.Servers`, pulls a study with its own client."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from storage import StudyQuery
from tests.support.dicomweb_server import TOKEN, DicomwebServer
from tests.support.services import free_port, wait_for

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@pytest.fixture
def orthanc(tmp_path: Path, gateway_server: DicomwebServer) -> Iterator[str]:
    binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not Path(binary).exists() or not PLUGIN.exists():
        pytest.fail("orthanc and orthanc-dicomweb are not installed: run `make test`")
    http_port = free_port()
    config = {
        "Name": "regional-hospital", "HttpPort": http_port, "DicomPort": free_port(),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "StorageDirectory": str(tmp_path / "storage"), "IndexDirectory": str(tmp_path / "index"),
        "Plugins": [str(PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {
            "gateway": {"Url": f"{gateway_server.url}/",
                        "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"}}}},
    }
    path = tmp_path / "orthanc.json"
    path.write_text(json.dumps(config))
    log = open(tmp_path / "orthanc.log", "wb")
    process = subprocess.Popen([binary, str(path)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/system", timeout=2).status_code == 200, timeout=60,
                 what="Orthanc to start")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture
def gateway_server(tmp_path: Path) -> Iterator[DicomwebServer]:
    with DicomwebServer(tmp_path / "gateway") as server:
        yield server


def test_orthanc_pulls_a_study_over_dicomweb(orthanc: str, gateway_server: DicomwebServer) -> None:
    [study] = gateway_server.index.search_studies(StudyQuery())
    # Orthanc's own DICOMweb client: QIDO through us, then WADO-RS retrieve into Orthanc.
    found = httpx.post(f"{orthanc}/dicom-web/servers/gateway/qido", json={"Uri": "/studies"},
                       timeout=60)
    assert found.status_code == 200, found.text
    assert study.study_instance_uid in found.text
    response = httpx.post(f"{orthanc}/dicom-web/servers/gateway/retrieve", timeout=120,
                          json={"Resources": [{"Study": study.study_instance_uid}]})
    assert response.status_code == 200, response.text
    instances = httpx.get(f"{orthanc}/instances", timeout=30).json()
    assert len(instances) == 6
    tags = httpx.get(f"{orthanc}/instances/{instances[0]}/simplified-tags", timeout=30).json()
    assert tags["StudyInstanceUID"] == study.study_instance_uid
    assert tags["PatientIdentityRemoved"] == "YES"
