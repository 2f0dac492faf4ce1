"""Measurements and image tools in the viewer (Chromium), checked against numpy on the
original pixels: length and angle in mm from Pixel Spacing, an elliptic ROI's HU
statistics, the pixel probe, the scale bar; rotation and flips move the orientation
markers; the viewport exports as a PNG; two views follow each other by slice position."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image, ImageStat
from pydicom.data import get_testdata_file

from storage import StudyQuery
from tests.e2e.test_viewer import ADMIN, ARTIFACTS, CHROMIUM, browser
from tests.support.dicomweb_server import DicomwebServer

__all__ = ["browser"]  # the viewer tests' fixture, used here


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DicomwebServer, str]]:
    """pydicom's CT_small as stored (signed, rescaled, 0.66 mm pixels), alone in its study;
    and the fixture's own sample study for the two views."""
    with DicomwebServer(tmp_path_factory.mktemp("measure")) as running:
        yield running, running.archive(pydicom.dcmread(get_testdata_file("CT_small.dcm")))


@pytest.fixture
def page(server: tuple[DicomwebServer, str], browser: Any) -> Iterator[Any]:
    running, study = server
    created = httpx.post(f"{running.root}/api/shares", headers=ADMIN,
                         json={"study_uids": [study], "expires_in": 3600}).json()
    context = browser.new_context(locale="fr-FR", viewport={"width": 1280, "height": 800},
                                  accept_downloads=True)
    opened = context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda e: problems.append(str(e)))
    opened.goto(created["url"])
    opened.wait_for_function("() => window.dgwViewer && window.dgwViewer.timings.firstImage !== undefined", timeout=15_000)
    yield opened
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    opened.screenshot(path=str(ARTIFACTS / "measurements.png"))
    context.close()
    assert problems == []


def _reference() -> tuple[np.ndarray, tuple[float, float]]:
    """Modality values (HU) and (row, column) spacing of CT_small, by pydicom and numpy."""
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    values = dataset.pixel_array.astype(np.float64) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    return values, (float(dataset.PixelSpacing[0]), float(dataset.PixelSpacing[1]))


def _to_page(page: Any, x: float, y: float) -> tuple[float, float]:
    return tuple(page.evaluate("([x, y]) => window.dgwViewer.app.viewports[0].toPage(x, y)", [x, y]))


def _drag(page: Any, start: tuple[float, float], end: tuple[float, float]) -> None:
    page.mouse.move(*_to_page(page, *start))
    page.mouse.down()
    page.mouse.move(*_to_page(page, *end), steps=8)
    page.mouse.up()


def _measurements(page: Any) -> list[dict[str, Any]]:
    return page.evaluate("() => window.dgwViewer.measurements")


def test_length_angle_roi_and_probe_match_numpy(page: Any) -> None:
    values, (row_mm, column_mm) = _reference()
    page.select_option("select[aria-label='Outil']", "length")
    _drag(page, (10, 20), (60, 20))
    [line] = _measurements(page)
    (x0, y0), (x1, y1) = line["points"]
    assert line["result"]["value"] == pytest.approx(math.hypot((x1 - x0) * column_mm, (y1 - y0) * row_mm), rel=1e-9)
    assert line["result"]["value"] == pytest.approx(50 * column_mm, rel=0.01) and line["result"]["unit"] == "mm"

    page.select_option("select[aria-label='Outil']", "angle")
    _drag(page, (20, 60), (60, 60))  # first arm, its end is the vertex
    _drag(page, (60, 60), (60, 20))  # second arm
    angle = _measurements(page)[-1]
    assert len(angle["points"]) == 3 and angle["result"]["value"] == pytest.approx(90, abs=1.0)

    page.select_option("select[aria-label='Outil']", "roi")
    _drag(page, (30, 30), (90, 70))
    roi = _measurements(page)[-1]
    (ax, ay), (bx, by) = roi["points"]
    cx, cy, rx, ry = (ax + bx) / 2, (ay + by) / 2, abs(bx - ax) / 2, abs(by - ay) / 2
    rows, columns = np.mgrid[0:values.shape[0], 0:values.shape[1]]
    inside = ((columns + 0.5 - cx) / rx) ** 2 + ((rows + 0.5 - cy) / ry) ** 2 <= 1
    expected = values[inside]
    result = roi["result"]
    assert result["count"] == expected.size > 1000
    assert result["mean"] == pytest.approx(expected.mean(), abs=1e-6)
    assert result["sd"] == pytest.approx(expected.std(), rel=1e-6)
    assert (result["min"], result["max"]) == (expected.min(), expected.max())
    assert result["area"] == pytest.approx(math.pi * rx * ry * row_mm * column_mm, rel=1e-9)

    page.select_option("select[aria-label='Outil']", "probe")
    page.mouse.click(*_to_page(page, 40.5, 50.5))
    probe = _measurements(page)[-1]["result"]
    assert (probe["column"], probe["row"]) == (40, 50) and probe["value"] == values[50, 40]

    bar = page.evaluate("() => { const v = window.dgwViewer.app.viewports[0]; return [v.scaleBar, v.scale]; }")
    assert bar[0]["mm"] in (1, 2, 5, 10, 20, 50)
    assert bar[0]["pixels"] == pytest.approx(bar[0]["mm"] / column_mm * bar[1], rel=0.01)
    page.click("button[aria-label='Effacer les mesures']")
    assert page.evaluate("() => window.dgwViewer.app.viewports[0].annotations.get("
                         "window.dgwViewer.app.viewports[0].frameKey())") is None


def _markers(page: Any) -> dict[str, str]:
    return page.evaluate("() => Object.fromEntries(Object.entries(window.dgwViewer.app.viewports[0].markers)"
                         ".map(([edge, node]) => [edge, node.textContent]))")


def test_rotation_and_flips_move_the_markers_and_the_view_exports(page: Any) -> None:
    assert CHROMIUM
    # CT_small: Image Orientation (Patient) 1\0\0\0\1\0 (rows to the patient's left, columns
    # to the back): the radiological view.
    assert _markers(page) == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    page.click("button[aria-label='Pivoter 90°']")  # clockwise: the top goes to the right
    assert _markers(page) == {"left": "P", "right": "A", "top": "R", "bottom": "L"}
    page.keyboard.press("r")
    page.click("button[aria-label='Miroir ↔']")
    assert _markers(page) == {"left": "L", "right": "R", "top": "A", "bottom": "P"}
    page.click("button[aria-label='Miroir ↕']")
    assert _markers(page) == {"left": "L", "right": "R", "top": "P", "bottom": "A"}
    with page.expect_download() as download:
        page.click("button[aria-label='Exporter (PNG)']")
    image = Image.open(download.value.path())
    size = page.evaluate("() => { const c = document.querySelector('.viewport canvas'); return [c.width, c.height]; }")
    assert image.format == "PNG" and list(image.size) == size
    assert ImageStat.Stat(image.convert("L")).stddev[0] > 10  # the image, not a blank canvas


def test_two_views_follow_each_other_by_slice_position(server: tuple[DicomwebServer, str],
                                                       browser: Any) -> None:
    running, measured = server
    study = next(s.study_instance_uid for s in running.index.search_studies(StudyQuery())
                 if s.study_instance_uid != measured)
    created = httpx.post(f"{running.root}/api/shares", headers=ADMIN,
                         json={"study_uids": [study], "expires_in": 3600}).json()
    context = browser.new_context(locale="fr-FR", viewport={"width": 1280, "height": 800})
    page = context.new_page()
    try:
        page.goto(created["url"])
        page.wait_for_function("() => window.dgwViewer.seriesLoaded >= 1", timeout=15_000)
        page.click("button[data-layout='2']")  # the second view opens the same series
        page.wait_for_function("() => window.dgwViewer.app.viewports[1].current", timeout=15_000)
        page.click("text=Synchroniser")
        page.locator(".viewport canvas").nth(1).click()
        page.keyboard.press("ArrowDown")
        page.keyboard.press("ArrowDown")
        page.wait_for_function("() => window.dgwViewer.app.viewports[0].index === 2", timeout=5_000)
        positions = page.evaluate("""() => window.dgwViewer.app.viewports.map(
            (v) => v.current.info.position[2])""")
        assert positions[0] == positions[1]
    finally:
        context.close()


def test_the_cine_rate_is_the_data_sets_or_the_chosen_one(page: Any) -> None:
    page.locator(".viewport canvas").first.focus()
    page.keyboard.press(" ")
    assert page.evaluate("() => window.dgwViewer.app.viewports[0].cineFps") == 15  # CT_small has none
    page.select_option("select[aria-label='Vitesse du ciné']", "30")  # taken at once
    assert page.evaluate("() => window.dgwViewer.app.viewports[0].cineFps") == 30
    page.keyboard.press(" ")
    assert page.evaluate("() => window.dgwViewer.app.viewports[0].cine") is None
