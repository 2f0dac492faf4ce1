"""Viewer sessions on a real server: renewed by activity up to the share's end, ended by
inactivity, and reopened by the same browser (PIN again) without spending a use; and the
viewer (Chromium) asks to reopen instead of failing."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from storage import StudyQuery
from tests.e2e.test_viewer import CHROMIUM, browser
from tests.support.dicomweb_server import TOKEN, DicomwebServer
from tests.support.services import wait_for
from access import SharePolicy, sha256_hex

__all__ = ["browser"]  # the viewer tests' fixture, used here
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Accept": "application/dicom+json"}
LIFETIME = dt.timedelta(seconds=2)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomwebServer]:
    with DicomwebServer(tmp_path_factory.mktemp("sessions"),
                        shares=SharePolicy(session_lifetime=LIFETIME)) as running:
        yield running


def _share(server: DicomwebServer, **body: object) -> dict[str, str]:
    study = server.index.search_studies(StudyQuery())[0].study_instance_uid
    answer = httpx.post(f"{server.root}/api/shares", headers=ADMIN,
                        json={"study_uids": [study], "expires_in": 3600, **body})
    assert answer.status_code == 201, answer.text
    return answer.json()


def _ended(server: DicomwebServer, cookie: str) -> None:
    """Wait, without a request (a request is activity), until the session has ended."""
    def ended() -> bool:
        with server.index.engine.connect() as connection:
            expires = connection.execute(text(
                "SELECT expires_at FROM share_sessions WHERE session_sha256 = :s"),
                {"s": sha256_hex(cookie)}).scalar_one()
        expires = dt.datetime.fromisoformat(str(expires))
        return (expires if expires.tzinfo else expires.replace(tzinfo=dt.UTC)) < dt.datetime.now(dt.UTC)
    wait_for(ended, timeout=10, what="the idle session to end")


def _uses(server: DicomwebServer, share_id: str) -> int:
    return int(httpx.get(f"{server.root}/api/shares/{share_id}", headers=ADMIN).json()["uses"])


def test_activity_renews_a_session_and_inactivity_ends_it(server: DicomwebServer) -> None:
    created = _share(server, pin="135790")
    root = f"{server.root}/s/{created['token']}"
    opened = httpx.post(f"{root}/session", json={"pin": "135790"})
    assert opened.status_code == 201
    with httpx.Client(cookies={"dgw_share_session": opened.cookies["dgw_share_session"]}) as reader:
        ends = time.monotonic() + 2.5 * LIFETIME.total_seconds()
        while time.monotonic() < ends:  # a reader at work: longer than a session lasts idle
            assert reader.get(f"{root}/dicom-web/studies", headers=JSON).status_code == 200
            time.sleep(0.25)
        _ended(server, opened.cookies["dgw_share_session"])
        ended = reader.get(f"{root}/dicom-web/studies", headers=JSON)
        assert ended.status_code == 401
        assert ended.json()["error"]["code"] == "share_session_required"


def test_the_same_browser_reopens_without_spending_a_use(server: DicomwebServer) -> None:
    created = _share(server, pin="246813", max_uses=1)
    root = f"{server.root}/s/{created['token']}"
    opened = httpx.post(f"{root}/session", data={"pin": "246813"})
    assert opened.status_code == 303 and _uses(server, created["id"]) == 1
    cookie = opened.cookies["dgw_share_session"]
    with httpx.Client(cookies={"dgw_share_session": cookie}) as reader:
        _ended(server, cookie)
        assert reader.get(f"{root}/dicom-web/studies", headers=JSON).status_code == 401
        page = reader.get(root)  # used up, but this browser held a session: the PIN again
        assert page.status_code == 200 and 'name="pin"' in page.text
        assert reader.post(f"{root}/session", data={"pin": "000000"}).status_code == 401
        again = reader.post(f"{root}/session", data={"pin": "246813"})
        assert again.status_code == 303
    with httpx.Client(cookies={"dgw_share_session": again.cookies["dgw_share_session"]}) as reader:
        assert reader.get(f"{root}/dicom-web/studies", headers=JSON).status_code == 200
    assert _uses(server, created["id"]) == 1
    assert httpx.get(root).status_code == 410  # another browser: the share is used up
    assert httpx.post(f"{root}/session", data={"pin": "246813"}).status_code == 410


def test_the_viewer_asks_to_reopen_an_ended_session(server: DicomwebServer, browser: Any) -> None:
    assert CHROMIUM
    created = _share(server, pin="864200", max_uses=1)
    context = browser.new_context(locale="fr-FR", viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()
        page.goto(created["url"])
        page.fill("input[name=pin]", "864200")
        page.click("button[type=submit]")
        page.wait_for_function("() => window.dgwViewer && window.dgwViewer.timings.firstImage !== undefined", timeout=15_000)
        [cookie] = [c["value"] for c in context.cookies() if c["name"] == "dgw_share_session"]
        _ended(server, cookie)  # the reader leaves
        tiles = page.locator(".series-tile")
        tiles.nth(tiles.count() - 1).click()  # back at work: another series, asked for now
        dialog = page.locator("dialog.session-ended")
        dialog.wait_for()
        assert "aucune ouverture n'est décomptée" in dialog.inner_text()
        dialog.locator("button").click()
        page.locator("input[name=pin]").wait_for()
        page.fill("input[name=pin]", "864200")
        page.click("button[type=submit]")
        page.wait_for_function("() => window.dgwViewer && window.dgwViewer.timings.firstImage !== undefined", timeout=15_000)
    finally:
        context.close()
    assert _uses(server, created["id"]) == 1
