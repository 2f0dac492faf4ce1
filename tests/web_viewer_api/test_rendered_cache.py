"""The rendered-image cache: a byte budget, least recently used dropped first; the render
limits' refusals name the limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from web_viewer_api.dicomweb.rendering import RenderedCache, RenderLimits


def test_the_least_recently_used_image_goes_first_once_over_budget() -> None:
    lookups: list[str] = []
    cache = RenderedCache(budget_bytes=10, on_lookup=lookups.append)
    cache.put("a", b"aaaa")
    cache.put("b", b"bbbb")
    assert cache.get("a") == b"aaaa"  # now "b" is the least recently used
    cache.put("c", b"cccc")
    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c")) == (b"aaaa", b"cccc")
    assert cache.size_bytes == 8
    assert lookups == ["hit", "miss", "hit", "hit"] and (cache.hits, cache.misses) == (3, 1)


def test_an_image_larger_than_the_budget_is_not_kept() -> None:
    cache = RenderedCache(budget_bytes=4)
    cache.put("small", b"1234")
    cache.put("large", b"12345")
    assert cache.get("large") is None and cache.get("small") == b"1234"
    nothing = RenderedCache(budget_bytes=0)
    nothing.put("any", b"x")
    assert nothing.get("any") is None and nothing.size_bytes == 0


def test_replacing_an_entry_counts_its_bytes_once() -> None:
    cache = RenderedCache(budget_bytes=8)
    cache.put("a", b"1234")
    cache.put("a", b"123456")
    assert cache.size_bytes == 6 and cache.get("a") == b"123456"


def test_render_limits_refuse_by_pixels_and_by_decoded_size() -> None:
    limits = RenderLimits(max_frame_megapixels=1.0, max_frame_bytes=2 * 1024 * 1024)
    assert limits.refusal(1000, 1000, 1, 16) is None
    assert "1 megapixels" in (limits.refusal(1000, 1001) or "")
    assert "2 MiB" in (limits.refusal(1000, 1000, 3, 8) or "")


def test_the_render_settings_reach_the_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.components import build_api
    from gateway.settings import Settings

    monkeypatch.setenv("DICOM_GATEWAY_PSEUDONYM_SECRET", "render-secret-0123456789abcdef")
    monkeypatch.setenv("DICOM_GATEWAY_ADMIN_TOKEN", "render-test-token-0123456789abcdef")
    monkeypatch.setenv("DICOM_GATEWAY_HTTP__RENDER_MAX_MEGAPIXELS", "2.5")
    monkeypatch.setenv("DICOM_GATEWAY_HTTP__RENDER_MAX_FRAME_MB", "8")
    monkeypatch.setenv("DICOM_GATEWAY_HTTP__RENDER_CACHE_MB", "0")
    app = build_api(Settings(data_dir=tmp_path))
    assert app.state.config.rendering == RenderLimits(2.5, 8 * 1024 * 1024, 0)
    assert app.state.rendered_cache is None  # 0: no cache
    monkeypatch.setenv("DICOM_GATEWAY_HTTP__RENDER_CACHE_MB", "3")
    app = build_api(Settings(data_dir=tmp_path / "cached"))
    assert app.state.rendered_cache.budget_bytes == 3 * 1024 * 1024
