"""The viewer on a remote link (Chromium's network emulation: 20 Mbit/s, 40 ms): frames
travel as stored (HTJ2K, decoded in the browser), the image on screen comes before the
prefetch: first image within 1.5 s, and every image reached by holding ↓ shown within
300 ms of its turn."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.importer import run_import
from spool import Spool
from tests.e2e.test_viewer import ADMIN, ARTIFACTS, CHROMIUM, browser
from tests.support.dicomweb_server import DicomwebServer
from tests.support.real_series import real_ct_series

__all__ = ["browser"]  # the viewer tests' fixture, used here
SLICES = 80
LINK = {"offline": False, "latency": 40, "downloadThroughput": 20_000_000 / 8,
        "uploadThroughput": 20_000_000 / 8}


@pytest.fixture(scope="module")
def long_ct(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DicomwebServer, str]]:
    root = tmp_path_factory.mktemp("viewer-network")
    with DicomwebServer(root) as running:
        run_import([real_ct_series(root / "ct", SLICES)], running.pipeline, Spool(root / "spool", "site1"))
        studies = httpx.get(f"{running.url}/studies", headers=ADMIN).json()
        [study] = [s["0020000D"]["Value"][0] for s in studies
                   if s["00201208"]["Value"][0] == SLICES]
        yield running, study


def test_a_remote_reader_sees_the_first_image_and_every_step_in_time(
        long_ct: tuple[DicomwebServer, str], browser: Any) -> None:
    assert CHROMIUM  # Debian's, as every viewer test
    server, study = long_ct
    created = httpx.post(f"{server.root}/api/shares", headers=ADMIN,
                         json={"study_uids": [study], "expires_in": 3600}).json()
    context = browser.new_context(locale="fr-FR", viewport={"width": 1280, "height": 800})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    cdp = context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", LINK)
    try:
        page.goto(created["url"])
        page.wait_for_function("() => window.dgwViewer && window.dgwViewer.timings.firstImageSinceNavigation !== undefined",
                               timeout=20_000)
        first = page.evaluate("() => window.dgwViewer.timings.firstImageSinceNavigation")
        assert first < 1500, f"first image after {first:.0f} ms"
        canvas = page.locator(".viewport canvas").first
        canvas.focus()
        for _ in range(SLICES - 1):  # holding ↓: the key repeats every 33 ms
            page.keyboard.press("ArrowDown")
            page.wait_for_timeout(33)
        page.wait_for_function(f"() => document.querySelector('.viewport canvas').dataset.index === '{SLICES - 1}'",
                               timeout=10_000)
        asked, painted = page.evaluate("() => [window.dgwViewer.timings.asked, window.dgwViewer.timings.painted]")
        waits = []
        for index, at in asked:  # until that image, or one further down, is on screen
            shown = min(t for i, t in painted if i >= index and t >= at)
            waits.append(shown - at)
        transferred = page.evaluate("() => window.dgwViewer.app.api.bytes")
        decoders = page.evaluate("() => [...window.dgwViewer.app.api.decoders.workers.keys()]")
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "remote-reader.png"))
        context.close()
    assert len(waits) == SLICES - 1
    assert max(waits) <= 300, f"slowest step {max(waits):.0f} ms; waits {[round(w) for w in waits]}"
    assert decoders == ["htj2k"]
    # Frames as stored: a 512x512 16-bit slice is 512 KB raw; stored, well under half.
    assert transferred < SLICES * 512 * 1024 * 0.5, transferred
    assert problems == []
