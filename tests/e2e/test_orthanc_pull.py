"""The regional hospital's case: Orthanc (Debian's orthanc + orthanc-dicomweb), configured
with our DICOMweb root in `DicomWeb.Servers`, pulls a study with its own client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from storage import StudyQuery
from tests.support.dicomweb_server import TOKEN, DicomwebServer
from tests.support.orthanc import Orthanc


@pytest.fixture
def orthanc(tmp_path: Path, gateway_server: DicomwebServer) -> Iterator[str]:
    try:
        pacs = Orthanc(tmp_path / "orthanc", {"gateway": (gateway_server.url, TOKEN)})
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
    with pacs:
        yield pacs.url


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
