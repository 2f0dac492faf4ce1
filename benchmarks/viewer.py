"""Viewer speed: time to the first image and to the whole series, for a share of a 300-image
CT series (512x512, stored HTJ2K, the default), opened in Debian's Chromium over loopback; and the ways
the browser could get frames (as stored, raw native frames decoded server-side,
server-rendered PNG), timed on the same series.

With --network: on Chromium's emulated 20 Mbit/s, 40 ms link, a series of real CT slices
(pydicom-data's 693_UNCR) opened in our viewer and in OHIF 3.13 (prebuilt, from npm) on the
same share, alternated: time to the first image, then ↓ held (a key press every 33 ms) through
the series: how long each step waits until its image (or a later one) is on screen.
Run: python benchmarks/viewer.py [--slices 300] [--runs 3] [--network]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from gateway.importer import run_import  # noqa: E402
from gateway.sample_study import SampleStudySpec, write_sample_study  # noqa: E402
from spool import Spool  # noqa: E402
from storage import InstanceQuery, StudyQuery  # noqa: E402
from tests.support.dicomweb_server import TOKEN, DicomwebServer  # noqa: E402
from tests.support.ohif import ohif_dist, serving_ohif  # noqa: E402
from tests.support.real_series import real_ct_series  # noqa: E402
from tests.support.services import free_port  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

FETCH_ALL = """async ([urls, accept, concurrency]) => {
  const started = performance.now(); let next = 0, bytes = 0;
  const worker = async () => { while (next < urls.length) { const u = urls[next++];
    const r = await fetch(u, {headers: {Accept: accept}}); bytes += (await r.arrayBuffer()).byteLength; } };
  await Promise.all(Array.from({length: concurrency}, worker));
  return [performance.now() - started, bytes];
}"""


LINK = {"offline": False, "latency": 40, "downloadThroughput": 20_000_000 / 8,
        "uploadThroughput": 20_000_000 / 8}
STEP_MS = 33
READ_FIRST_MS = 3000  # the reader looks at the first image before holding ↓ (both viewers)
# OHIF: when each ↓ was pressed, and each time cornerstone3D rendered which image of the
# stack (its IMAGE_RENDERED event on the viewport's element: the image is on screen).
OHIF_PROBE = """(() => {
  window.__asked = []; window.__painted = [];
  document.addEventListener('keydown', (e) => { if (e.key === 'ArrowDown') window.__asked.push(performance.now()); }, true);
  const watched = new WeakSet();
  setInterval(() => {
    const cs = window.cornerstone;
    if (!cs || !cs.getRenderingEngines) return;
    for (const engine of cs.getRenderingEngines()) for (const viewport of engine.getViewports()) {
      if (watched.has(viewport.element) || !viewport.getCurrentImageIdIndex) continue;
      watched.add(viewport.element);
      viewport.element.addEventListener(cs.Enums.Events.IMAGE_RENDERED, () =>
        window.__painted.push([viewport.getCurrentImageIdIndex(), performance.now()]));
    }
  }, 20);
})();"""


def _waits(asked: list[tuple[int, float]], painted: list[tuple[int, float]]) -> list[float]:
    """For each step, until its image or a later one was on screen (ms)."""
    waits = []
    for index, at in asked:
        shown = [t for i, t in painted if i >= index and t >= at]
        waits.append((min(shown) if shown else float("inf")) - at)
    return waits


def _hold_down(page: Any, slices: int) -> None:
    for _ in range(slices - 1):
        page.keyboard.press("ArrowDown")
        page.wait_for_timeout(STEP_MS)


def _ours_on_link(browser: Any, url: str, slices: int) -> tuple[float, list[float]]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    cdp = context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", LINK)
    page.goto(url)
    page.wait_for_function("() => window.dgwViewer.timings.firstImageSinceNavigation", timeout=60_000)
    first = page.evaluate("() => window.dgwViewer.timings.firstImageSinceNavigation")
    page.wait_for_timeout(READ_FIRST_MS)
    page.locator(".viewport canvas").first.focus()
    _hold_down(page, slices)
    page.wait_for_function(f"() => document.querySelector('.viewport canvas').dataset.index === '{slices - 1}'",
                           timeout=120_000)
    asked, painted = page.evaluate("() => [window.dgwViewer.timings.asked, window.dgwViewer.timings.painted]")
    context.close()
    return first, _waits(asked, painted)


def _ohif_on_link(browser: Any, origin: str, study: str, slices: int) -> tuple[float, list[float]]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.add_init_script(OHIF_PROBE)
    page = context.new_page()
    cdp = context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", LINK)
    page.goto(f"{origin}/viewer?StudyInstanceUIDs={study}")
    page.wait_for_function("() => window.__painted.length > 0", timeout=120_000, polling=20)
    first = page.evaluate("() => window.__painted[0][1]")
    page.wait_for_timeout(READ_FIRST_MS)
    page.locator("canvas.cornerstone-canvas").first.click()
    _hold_down(page, slices)
    # Until OHIF's overlay has not changed for 5 s (it may never reach the last image when it
    # drops key presses): each step that was never shown counts as an infinite wait.
    settled, seen = 0.0, -1
    for _ in range(3000):
        count = page.evaluate("() => window.__painted.length")
        settled = settled + 0.1 if count == seen else 0.0
        seen = count
        if settled >= 5:
            break
        page.wait_for_timeout(100)
    asked, painted = page.evaluate("() => [window.__asked, window.__painted]")
    start = painted[0][0]
    context.close()
    return first, _waits([(start + k + 1, at) for k, at in enumerate(asked)], painted)


def network(args: argparse.Namespace, work: Path) -> None:
    origin_port = free_port()
    origin = f"http://127.0.0.1:{origin_port}"
    with DicomwebServer(work / "gateway", cors_origins=(origin,)) as server:
        run_import([real_ct_series(work / "ct", args.slices)], server.pipeline,
                   Spool(work / "gateway" / "spool", "site1"))
        study = next(s for s in server.index.search_studies(StudyQuery(limit=100))
                     if s.number_of_instances == args.slices).study_instance_uid
        results: dict[str, tuple[list[float], list[float]]] = {"ours": ([], []), "OHIF 3.13": ([], [])}
        dist = ohif_dist()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
            for run in range(args.runs):
                url = httpx.post(f"{server.root}/api/shares", headers={"Authorization": f"Bearer {TOKEN}"},
                                 json={"study_uids": [study], "expires_in": 3600}).json()["url"]
                for name in (["ours", "OHIF 3.13"] if run % 2 == 0 else ["OHIF 3.13", "ours"]):
                    if name == "ours":
                        first, waits = _ours_on_link(browser, url, args.slices)
                    else:
                        with serving_ohif(dist, url + "/dicom-web", origin_port):
                            first, waits = _ohif_on_link(browser, origin, study, args.slices)
                    results[name][0].append(first)
                    results[name][1].extend(waits)
            browser.close()
    print(f"share of {args.slices} real 512x512 CT slices (stored HTJ2K), Chromium on an emulated "
          f"20 Mbit/s, 40 ms link, {args.runs} runs alternated:")
    for name, (firsts, waits) in results.items():
        ordered = sorted(waits)
        never = sum(1 for w in waits if w == float("inf"))
        print(f"  {name:10s} first image median {statistics.median(firsts):6.0f} ms "
              f"(runs: {', '.join(f'{v:.0f}' for v in firsts)}); ↓ held, each step until shown: "
              f"median {statistics.median(ordered):5.0f} ms, p95 {ordered[int(len(ordered) * 0.95)]:6.0f}, "
              f"max {ordered[-1]:6.0f}" + (f"; {never} of {len(waits)} steps never shown" if never else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--network", action="store_true",
                        help="ours and OHIF on an emulated 20 Mbit/s, 40 ms link")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dgw-viewer-"))
    if args.network:
        try:
            network(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    try:
        with DicomwebServer(work / "gateway") as server:
            source = work / "ct"
            write_sample_study(source, SampleStudySpec(ct_slices=args.slices, mr_slices=0, seed=77))
            run_import([source], server.pipeline, Spool(work / "gateway" / "spool", "site1"))
            study = next(s for s in server.index.search_studies(StudyQuery(limit=100))
                         if s.number_of_instances == args.slices)
            instances = server.index.search_instances(InstanceQuery(
                study_instance_uid=study.study_instance_uid, limit=10_000))
            first, loaded = [], []
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
                for _ in range(args.runs):
                    url = httpx.post(f"{server.root}/api/shares", headers={"Authorization": f"Bearer {TOKEN}"},
                                     json={"study_uids": [study.study_instance_uid], "expires_in": 3600}).json()["url"]
                    page = browser.new_page()
                    page.goto(url)
                    page.wait_for_function("() => window.dgwViewer.timings.seriesLoadedSinceNavigation", timeout=300_000)
                    timings = page.evaluate("() => window.dgwViewer.timings")
                    first.append(timings["firstImageSinceNavigation"])
                    loaded.append(timings["seriesLoadedSinceNavigation"])
                    page.close()
                page = browser.new_page()
                page.goto(url)
                page.wait_for_function("() => window.dgwViewer.timings.firstImageSinceNavigation")
                root = url + "/dicom-web"
                base = [f"{root}/studies/{i.study_instance_uid}/series/{i.series_instance_uid}/instances/{i.sop_instance_uid}"
                        for i in instances]
                stored = page.evaluate(FETCH_ALL, [[b + "/frames/1" for b in base],
                                                  'multipart/related; type="image/jphc"', 6])
                raw = page.evaluate(FETCH_ALL, [[b + "/frames/1" for b in base],
                                               'multipart/related; type="application/octet-stream"', 6])
                png = page.evaluate(FETCH_ALL, [[b + "/rendered" for b in base], "image/png", 6])
                jpeg = page.evaluate(FETCH_ALL, [[b + "/rendered" for b in base], "image/jpeg", 6])
                browser.close()
        size = instances[0].rows
        print(f"share of one {args.slices}-image CT series ({size}x{size}, stored HTJ2K), "
              f"Chromium on loopback, {args.runs} runs:")
        print(f"  first image painted   median {statistics.median(first):7.0f} ms after navigation "
              f"(runs: {', '.join(f'{v:.0f}' for v in first)})")
        print(f"  whole series loaded   median {statistics.median(loaded):7.0f} ms after navigation "
              f"(runs: {', '.join(f'{v:.0f}' for v in loaded)})")
        print(f"all {args.slices} frames fetched by the page, 6 at a time:")
        for name, (elapsed, total) in (("frames as stored (viewer's choice)", stored),
                                       ("raw native frames", raw),
                                       ("server-rendered PNG", png), ("server-rendered JPEG", jpeg)):
            print(f"  {name:38s} {elapsed:7.0f} ms  {total / 1e6:6.1f} MB  "
                  f"{args.slices / elapsed * 1000:6.0f} frames/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
