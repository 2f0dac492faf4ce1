"""The share viewer in Debian's Chromium (Playwright): PIN, first image, W/L, scrolling,
layouts, languages, narrow screens, error pages; screenshots in test-artifacts/viewer/."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from storage import ShareItemRecord, ShareRecord, StudyQuery
from tests.support.dicomweb_server import TOKEN, DicomwebServer
from access import sha256_hex

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "viewer"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}

# Canvas statistics computed in the page: mean, spread and a checksum of the pixels.
CANVAS_STATS = """(selector) => {
  const canvas = document.querySelector(selector);
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let sum = 0, sumSq = 0, lit = 0, hash = 0;
  for (let i = 0; i < data.length; i += 4) {
    const v = data[i]; sum += v; sumSq += v * v; if (v > 8) lit++;
    hash = (hash * 31 + v + data[i + 1] * 7 + data[i + 2] * 13) >>> 0;
  }
  const n = data.length / 4, mean = sum / n;
  return {mean, std: Math.sqrt(sumSq / n - mean * mean), lit: lit / n, hash};
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomwebServer]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: make test installs it (apt-get install chromium)")
    with DicomwebServer(tmp_path_factory.mktemp("viewer"), studies=2) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    context = browser.new_context(locale="fr-FR", viewport={"width": 1280, "height": 800})
    opened = context.new_page()
    problems: list[str] = []
    opened.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    opened.on("pageerror", lambda e: problems.append(str(e)))
    opened.problems = problems
    yield opened
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    opened.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"))
    context.close()


def _share(server: DicomwebServer, **body: object) -> dict[str, str]:
    study = sorted(s.study_instance_uid for s in server.index.search_studies(StudyQuery()))[0]
    answer = httpx.post(f"{server.root}/api/shares", headers=ADMIN,
                        json={"study_uids": [study], "expires_in": 3600, **body})
    assert answer.status_code == 201, answer.text
    return answer.json()


def _first_image(page: Any) -> None:
    page.wait_for_function("() => window.dgwViewer && window.dgwViewer.timings.firstImage !== undefined",
                           timeout=15_000)


def test_pin_then_first_image_then_wl_and_scrolling_change_the_pixels(server: DicomwebServer,
                                                                      page: Any) -> None:
    created = _share(server, pin="246810", note="Avis sur la lésion du lobe inférieur")
    page.goto(created["url"])
    assert page.locator("input[name=pin]").is_visible()
    assert "Avis sur la lésion" not in page.content()  # the note is for whoever has the PIN
    page.fill("input[name=pin]", "000000")
    page.click("button[type=submit]")
    assert page.locator(".error").inner_text().startswith("Code PIN erroné")
    page.problems.clear()  # the browser logs the expected 401 of the wrong PIN
    page.fill("input[name=pin]", "246810")
    page.click("button[type=submit]")
    _first_image(page)
    assert "Avis sur la lésion du lobe inférieur" in page.locator(".note").first.inner_text()
    canvas = ".viewport canvas"
    first = page.evaluate(CANVAS_STATS, canvas)
    assert first["lit"] > 0.05 and first["std"] > 5, first
    page.focus(canvas)
    page.keyboard.press("ArrowDown")
    page.wait_for_function(f"() => document.querySelector('{canvas}').dataset.index === '1'")
    scrolled = page.evaluate(CANVAS_STATS, canvas)
    assert scrolled["hash"] != first["hash"]
    assert "Im 2 / " in page.locator(".overlay.tr").first.inner_text()
    page.keyboard.press("4")  # brain window: narrow, changes the rendering
    page.wait_for_function(f"(h) => {{ const s = ({CANVAS_STATS})('{canvas}'); return s.hash !== h; }}",
                           arg=scrolled["hash"])
    assert "W 80  L 40" in page.locator(".overlay.bl").first.inner_text()
    windowed = page.evaluate(CANVAS_STATS, canvas)
    page.keyboard.press("i")
    page.wait_for_function(f"(h) => ({CANVAS_STATS})('{canvas}').hash !== h", arg=windowed["hash"])
    page.keyboard.press("i")
    page.wait_for_function(f"(h) => ({CANVAS_STATS})('{canvas}').hash === h", arg=windowed["hash"])
    box = page.locator(canvas).bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -300)  # back to the first image
    page.wait_for_function(f"() => document.querySelector('{canvas}').dataset.index === '0'")
    page.wait_for_function("() => window.dgwViewer.seriesLoaded >= 1", timeout=15_000)
    assert page.problems == []


def test_two_views_compare_series_and_help_lists_the_keys(server: DicomwebServer, page: Any) -> None:
    page.goto(_share(server)["url"])
    _first_image(page)
    page.click("button[data-layout='2']")
    assert page.locator(".viewport").count() == 2
    tiles = page.locator(".series-tile")
    assert tiles.count() == 2
    tiles.nth(1).click()
    page.wait_for_function(
        "() => document.querySelectorAll('.viewport .overlay.tr')[1].innerText.startsWith('MR')")
    left = page.evaluate("() => document.querySelectorAll('.viewport .overlay.tr')[0].innerText")
    right = page.evaluate("() => document.querySelectorAll('.viewport .overlay.tr')[1].innerText")
    assert left.split()[0] != right.split()[0]  # CT beside MR
    page.keyboard.press("?")
    assert page.locator("dialog[open] kbd").count() >= 10
    assert page.problems == []


def test_keyboard_only_and_english(server: DicomwebServer, browser: Any) -> None:
    context = browser.new_context(locale="en-US", extra_http_headers={"Accept-Language": "en-US,en;q=0.9"})
    page = context.new_page()
    page.goto(_share(server)["url"])
    _first_image(page)
    assert page.locator("html").get_attribute("lang") == "en"
    assert page.get_by_role("button", name="Invert").is_visible()
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.classList.contains('series-tile')"):
            break
    page.keyboard.press("Tab")  # the second series
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('.series-tile.active') === document.activeElement")
    page.click("text=Français")
    page.wait_for_function("() => document.documentElement.lang === 'fr'")
    context.close()


def test_phone_width_shows_the_image_without_horizontal_scrolling(server: DicomwebServer,
                                                                  browser: Any) -> None:
    context = browser.new_context(viewport={"width": 360, "height": 740}, has_touch=True,
                                  is_mobile=True)
    page = context.new_page()
    page.goto(_share(server)["url"])
    _first_image(page)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 360
    stats = page.evaluate(CANVAS_STATS, ".viewport canvas")
    assert stats["lit"] > 0.02
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "phone-360.png"))
    context.close()


def test_download_button_only_when_allowed(server: DicomwebServer, page: Any) -> None:
    page.goto(_share(server)["url"])
    _first_image(page)
    assert page.locator("a[href$='/download']").count() == 0
    page.goto(_share(server, allow_download=True)["url"])
    _first_image(page)
    with page.expect_download() as download:
        page.click("a[href$='/download']")
    assert download.value.suggested_filename.endswith(".zip")


def test_expired_revoked_and_unknown_links_get_clear_pages(server: DicomwebServer, page: Any) -> None:
    created = _share(server)
    assert httpx.delete(f"{server.root}/api/shares/{created['id']}", headers=ADMIN).status_code == 200
    answer = page.goto(created["url"])
    assert answer.status == 410 and "révoqué" in page.inner_text("h1")
    page.screenshot(path=str(ARTIFACTS / "revoked.png"))
    now = dt.datetime.now(dt.UTC)
    token = "viewer-expired-token-0123456789abcdef"
    study = server.index.search_studies(StudyQuery())[0].study_instance_uid
    server.access.add_share(ShareRecord(
        share_id="viewerexpired0001", created_at=now - dt.timedelta(days=1), created_by="test",
        expires_at=now - dt.timedelta(minutes=1), revoked_at=None, pin_hash=None, pin_failures=0,
        locked_at=None, max_uses=None, uses=0, permissions=frozenset(), recipient="",
        recipient_email="", note="", site_ids=None, items=(ShareItemRecord(study),)), sha256_hex(token))
    answer = page.goto(f"{server.root}/s/{token}?lang=en")
    assert answer.status == 410 and "expired" in page.inner_text("h1")
    page.screenshot(path=str(ARTIFACTS / "expired.png"))
    used = _share(server, max_uses=1)
    assert httpx.post(f"{used['url']}/session", json={}).status_code == 201
    answer = page.goto(used["url"] + "?lang=en")
    assert answer.status == 410 and "maximum number of times" in page.inner_text("h1")
    answer = page.goto(f"{server.root}/s/no-such-token-0123456789abcdefghijk")
    assert answer.status == 404 and page.inner_text("h1") == "Lien introuvable"
