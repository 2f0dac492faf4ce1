"""A series longer than a QIDO-RS page (1,000 rows) is shown whole in the viewer: 1,001
small CT images, the last one reached with End."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.importer import run_import
from gateway.sample_study import SampleStudySpec, write_sample_study
from spool import Spool
from tests.e2e.test_viewer import ADMIN, CHROMIUM, browser
from tests.support.dicomweb_server import DicomwebServer

__all__ = ["browser"]  # the viewer tests' fixture, used here
SLICES = 1001


@pytest.fixture(scope="module")
def long_series(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DicomwebServer, str]]:
    root = tmp_path_factory.mktemp("long-series")
    with DicomwebServer(root) as running:
        files = write_sample_study(root / "long", SampleStudySpec(ct_slices=SLICES, mr_slices=0,
                                                                  ct_size=16, seed=9))
        run_import(files, running.pipeline, Spool(root / "spool", "site1"))
        studies = httpx.get(f"{running.url}/studies", headers=ADMIN).json()
        [study] = [s["0020000D"]["Value"][0] for s in studies if s["00201208"]["Value"][0] == SLICES]
        yield running, study


def test_a_series_of_1001_images_is_shown_whole(long_series: tuple[DicomwebServer, str],
                                                browser: Any) -> None:
    assert CHROMIUM
    server, study = long_series
    created = httpx.post(f"{server.root}/api/shares", headers=ADMIN,
                         json={"study_uids": [study], "expires_in": 3600}).json()
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        page.goto(created["url"])
        page.wait_for_function("() => window.dgwViewer && window.dgwViewer.timings.firstImage !== undefined", timeout=30_000)
        assert f"/ {SLICES}" in page.locator(".overlay.tr").first.inner_text()
        page.locator(".viewport canvas").first.focus()
        page.keyboard.press("End")
        page.wait_for_function(f"() => document.querySelector('.viewport canvas').dataset.index === '{SLICES - 1}'",
                               timeout=30_000)
        assert f"Im {SLICES} / {SLICES}" in page.locator(".overlay.tr").first.inner_text()
    finally:
        page.close()
