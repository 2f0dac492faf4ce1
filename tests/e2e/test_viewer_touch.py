"""The viewer on a phone (Chromium with touch, 390x844): one finger scrolls, two fingers
pinch to zoom and move to pan, the tool selector is obeyed by touch, the sender's note is
readable and the help speaks of fingers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from storage import StudyQuery
from tests.e2e.test_viewer import ADMIN, ARTIFACTS, CHROMIUM, browser
from tests.support.dicomweb_server import DicomwebServer

__all__ = ["browser"]  # the viewer tests' fixture, used here


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomwebServer]:
    with DicomwebServer(tmp_path_factory.mktemp("viewer-touch")) as running:
        yield running


def _touch(cdp: Any, kind: str, points: list[tuple[float, float]]) -> None:
    cdp.send("Input.dispatchTouchEvent", {
        "type": kind, "touchPoints": [{"x": x, "y": y, "id": n} for n, (x, y) in enumerate(points)]})


def _drag(cdp: Any, starts: list[tuple[float, float]], ends: list[tuple[float, float]]) -> None:
    _touch(cdp, "touchStart", starts)
    for step in range(1, 11):
        _touch(cdp, "touchMove", [(sx + (ex - sx) * step / 10, sy + (ey - sy) * step / 10)
                                  for (sx, sy), (ex, ey) in zip(starts, ends, strict=True)])
    _touch(cdp, "touchEnd", [])


def _state(page: Any) -> dict[str, Any]:
    return page.evaluate("""() => { const v = window.dgwViewer.app.viewports[0];
      return {index: v.index, zoom: v.zoom, pan: v.pan, window: v.window}; }""")


def test_one_finger_scrolls_two_fingers_zoom_and_pan_and_touch_obeys_the_tool(
        server: DicomwebServer, browser: Any) -> None:
    assert CHROMIUM
    study = server.index.search_studies(StudyQuery())[0].study_instance_uid
    created = httpx.post(f"{server.root}/api/shares", headers=ADMIN, json={
        "study_uids": [study], "expires_in": 3600, "note": "Merci de comparer avec le scanner de 2024"}).json()
    context = browser.new_context(locale="fr-FR", viewport={"width": 390, "height": 844},
                                  has_touch=True, is_mobile=True, device_scale_factor=3)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    try:
        page.goto(created["url"])
        page.wait_for_function("() => window.dgwViewer && window.dgwViewer.timings.firstImage !== undefined", timeout=15_000)
        page.wait_for_function("() => window.dgwViewer.seriesLoaded >= 1", timeout=15_000)
        note = page.locator(".sidebar .note")
        assert note.is_visible() and "comparer avec le scanner" in note.inner_text()
        assert page.evaluate("() => window.dgwViewer.app.tool") == "scroll"
        box = page.locator(".viewport canvas").first.bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        cdp = context.new_cdp_session(page)

        _drag(cdp, [(cx, cy - 60)], [(cx, cy + 60)])  # one finger down the image: next images
        page.wait_for_function("() => window.dgwViewer.app.viewports[0].index > 0")
        scrolled = _state(page)
        assert scrolled["zoom"] == 1

        _drag(cdp, [(cx - 40, cy), (cx + 40, cy)], [(cx - 120, cy + 30), (cx + 120, cy + 30)])
        pinched = _state(page)
        assert pinched["zoom"] == pytest.approx(3.0, rel=0.05)  # fingers 80 -> 240 px apart
        assert pinched["pan"] == pytest.approx([0, 30], abs=1)  # their middle moved 30 px down
        assert pinched["index"] == scrolled["index"]

        page.select_option("select[aria-label='Outil']", "wl")  # the tool selector, by touch
        before = pinched["window"]
        _drag(cdp, [(cx, cy)], [(cx + 80, cy + 40)])
        windowed = _state(page)
        assert windowed["window"] != before and windowed["index"] == scrolled["index"]

        page.click("button[aria-label='Aide']")
        assert "2 doigts : pincer" in page.locator("dialog").first.inner_text()
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "phone-touch.png"))
        context.close()
    assert problems == []
