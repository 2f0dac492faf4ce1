"""The prebuilt OHIF viewer (npm `@ohif/app`, its dist/) pointed at a share's DICOMweb root
shows the shared study: the share root works with an unmodified third-party viewer.

The package (≈ 50 MB) is fetched once with npm into ~/.cache/dicom-gateway (override with
DGW_CACHE_DIR); OHIF is served from its own origin, and the gateway allows that origin (CORS).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageStat

from storage import StudyQuery
from tests.support.dicomweb_server import TOKEN, DicomwebServer
from tests.support.services import free_port

OHIF_VERSION = "3.13.2"
CACHE = Path(os.environ.get("DGW_CACHE_DIR", Path.home() / ".cache" / "dicom-gateway"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ohif"


@pytest.fixture(scope="module")
def ohif_dist() -> Path:
    target = CACHE / f"ohif-app-{OHIF_VERSION}" / "dist"
    if (target / "index.html").is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm is needed to fetch @ohif/app (Debian: apt-get install npm)")
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([npm, "pack", f"@ohif/app@{OHIF_VERSION}", "--silent"], cwd=scratch,
                       check=True, capture_output=True, timeout=600)
        [archive] = Path(scratch).glob("ohif-app-*.tgz")
        unpacked = Path(scratch) / "unpacked"
        with tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(unpacked / "package" / "dist"), target)
    return target


def _app_config(dicomweb_root: str) -> str:
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "gateway",
        "configuration": {
            "friendlyName": "dicom-gateway share", "name": "gateway",
            "wadoUriRoot": dicomweb_root, "qidoRoot": dicomweb_root, "wadoRoot": dicomweb_root,
            "qidoSupportsIncludeField": False, "imageRendering": "wadors",
            "thumbnailRendering": "wadors", "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False, "supportsWildcard": True, "staticWado": False,
            "singlepart": "bulkdata,video", "bulkDataURI": {"enabled": True},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {"routerBasename": "/", "extensions": [], "modes": [], "showStudyList": False,
              "customizationService": {}, "showWarningMessageForCrossOrigin": False,
              "showCPUFallbackMessage": False, "defaultDataSourceName": "gateway",
              "dataSources": [source]}
    return f"window.config = {json.dumps(config)};\n"


class _SpaHandler(SimpleHTTPRequestHandler):
    """OHIF's dist as a single-page app: unknown paths get index.html; our app-config.js."""

    app_config = ""

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        if path == "/app-config.js":
            body = self.app_config.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/javascript")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if not (Path(self.directory) / path.lstrip("/")).is_file():
            self.path = "/index.html"
        super().do_GET()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def ohif_origin() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def server(tmp_path: Path, ohif_origin: str) -> Iterator[DicomwebServer]:
    with DicomwebServer(tmp_path / "gateway", cors_origins=(ohif_origin,)) as running:
        yield running


def test_prebuilt_ohif_shows_the_shared_study(server: DicomwebServer, ohif_dist: Path,
                                              ohif_origin: str) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    study = server.index.search_studies(StudyQuery())[0].study_instance_uid
    created = httpx.post(f"{server.root}/api/shares", headers={"Authorization": f"Bearer {TOKEN}"},
                         json={"study_uids": [study], "expires_in": 3600}).json()
    handler = partial(type("Handler", (_SpaHandler,), {"app_config": _app_config(created["url"] + "/dicom-web")}),
                      directory=str(ohif_dist))
    port = int(ohif_origin.rsplit(":", 1)[1])
    httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    failures: list[str] = []
    try:
        with playwright_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("response", lambda r: failures.append(f"{r.status} {r.url}")
                    if r.url.startswith(server.root) and r.status >= 400 else None)
            page.goto(f"{ohif_origin}/viewer?StudyInstanceUIDs={study}")
            canvas = page.locator("canvas.cornerstone-canvas").first
            canvas.wait_for(state="visible", timeout=60_000)

            def painted() -> bool:
                image = Image.open(io.BytesIO(canvas.screenshot())).convert("L")
                stat = ImageStat.Stat(image)
                return stat.stddev[0] > 10 and stat.mean[0] > 5

            deadline = 60
            for _ in range(deadline * 2):
                if painted():
                    break
                page.wait_for_timeout(500)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "ohif-share.png"))
            assert painted(), "OHIF did not paint the shared study's image"
            browser.close()
    finally:
        httpd.shutdown()
    assert failures == []
