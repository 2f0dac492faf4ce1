"""A regional hospital's PACS for tests: Debian's Orthanc with its DICOMweb plugin, our
DICOMweb roots in `DicomWeb.Servers`, on free loopback ports. Usage::

    with Orthanc(tmp_path / "orthanc", {"gateway": (f"{api_url}/dicom-web", token)}) as pacs:
        httpx.post(f"{pacs.url}/dicom-web/servers/gateway/retrieve",
                   json={"Resources": [{"Study": study_uid}]})
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Self

import httpx

from tests.support.services import free_port, wait_for

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    """`servers`: name -> (DICOMweb root URL, bearer token) Orthanc may query and pull from."""

    def __init__(self, work_dir: Path, servers: Mapping[str, tuple[str, str]],
                 timeout: float = 60.0) -> None:
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(binary).exists() or not PLUGIN.exists():
            raise FileNotFoundError("orthanc and orthanc-dicomweb are not installed: run `make test`")
        self.binary, self.work_dir, self.timeout = binary, Path(work_dir), timeout
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.config = {
            "Name": "regional-hospital", "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "StorageDirectory": str(self.work_dir / "storage"),
            "IndexDirectory": str(self.work_dir / "index"), "Plugins": [str(PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {
                name: {"Url": url.rstrip("/") + "/", "HttpHeaders": {"Authorization": f"Bearer {token}"}}
                for name, (url, token) in servers.items()}},
        }
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __enter__(self) -> Self:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / "orthanc.json"
        path.write_text(json.dumps(self.config))
        self._log = open(self.work_dir / "orthanc.log", "wb")
        self._process = subprocess.Popen([self.binary, str(path)], stdout=self._log,
                                         stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: httpx.get(f"{self.url}/system", timeout=2).status_code == 200,
                     timeout=self.timeout, what="Orthanc to start")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._log is not None:
            self._log.close()
