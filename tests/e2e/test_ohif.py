"""The prebuilt OHIF viewer (npm `@ohif/app`, its dist/) pointed at a share's DICOMweb root
shows the shared study: the share root works with an unmodified third-party viewer.

The package (≈ 50 MB) is fetched once with npm into ~/.cache/dicom-gateway (override with
DGW_CACHE_DIR); OHIF is served from its own origin, and the gateway allows that origin (CORS).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageStat

from storage import StudyQuery
from tests.support.dicomweb_server import TOKEN, DicomwebServer
from tests.support.ohif import ohif_dist, serving_ohif
from tests.support.services import free_port

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ohif"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module", name="ohif_dist")
def fetched_ohif_dist() -> Path:
    try:
        return ohif_dist()
    except RuntimeError as exc:
        pytest.fail(str(exc))


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
    failures: list[str] = []
    port = int(ohif_origin.rsplit(":", 1)[1])
    with serving_ohif(ohif_dist, created["url"] + "/dicom-web", port), \
            playwright_api.sync_playwright() as playwright:
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
    assert failures == []
