"""The prebuilt OHIF viewer (npm `@ohif/app`, its dist/), fetched once and served from its own
origin with a data source pointed at a share's DICOMweb root: for the OHIF test and the
viewer benchmark. The package (≈ 50 MB) is cached in ~/.cache/dicom-gateway (override with
DGW_CACHE_DIR)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

OHIF_VERSION = "3.13.2"
CACHE = Path(os.environ.get("DGW_CACHE_DIR", Path.home() / ".cache" / "dicom-gateway"))


def ohif_dist() -> Path:
    """OHIF's dist/ folder, fetched with npm at its first use."""
    target = CACHE / f"ohif-app-{OHIF_VERSION}" / "dist"
    if (target / "index.html").is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is needed to fetch @ohif/app (Debian: apt-get install npm)")
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


def app_config(dicomweb_root: str) -> str:
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

    def do_GET(self) -> None:
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


@contextmanager
def serving_ohif(dist: Path, dicomweb_root: str, port: int) -> Iterator[str]:
    """OHIF on 127.0.0.1:`port`, reading `dicomweb_root`; yields its origin."""
    handler = partial(type("Handler", (_SpaHandler,), {"app_config": app_config(dicomweb_root)}),
                      directory=str(dist))
    httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        httpd.shutdown()
