"""Viewer speed: time to the first image and to the whole series, for a share of a 300-image
CT series (512x512, stored JPEG-LS), opened in Debian's Chromium over loopback; and the two
ways the browser could get frames (raw native frames decoded server-side vs server-rendered
PNG), timed on the same series.
Run: python benchmarks/viewer.py [--slices 300] [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from gateway.importer import run_import  # noqa: E402
from gateway.sample_study import SampleStudySpec, write_sample_study  # noqa: E402
from storage import InstanceQuery, StudyQuery  # noqa: E402
from tests.support.dicomweb_server import TOKEN, DicomwebServer  # noqa: E402
from worker import Spool  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

FETCH_ALL = """async ([urls, accept, concurrency]) => {
  const started = performance.now(); let next = 0, bytes = 0;
  const worker = async () => { while (next < urls.length) { const u = urls[next++];
    const r = await fetch(u, {headers: {Accept: accept}}); bytes += (await r.arrayBuffer()).byteLength; } };
  await Promise.all(Array.from({length: concurrency}, worker));
  return [performance.now() - started, bytes];
}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dgw-viewer-"))
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
                raw = page.evaluate(FETCH_ALL, [[b + "/frames/1" for b in base],
                                               'multipart/related; type="application/octet-stream"', 6])
                png = page.evaluate(FETCH_ALL, [[b + "/rendered" for b in base], "image/png", 6])
                jpeg = page.evaluate(FETCH_ALL, [[b + "/rendered" for b in base], "image/jpeg", 6])
                browser.close()
        size = instances[0].rows
        print(f"share of one {args.slices}-image CT series ({size}x{size}, stored JPEG-LS), "
              f"Chromium on loopback, {args.runs} runs:")
        print(f"  first image painted   median {statistics.median(first):7.0f} ms after navigation "
              f"(runs: {', '.join(f'{v:.0f}' for v in first)})")
        print(f"  whole series loaded   median {statistics.median(loaded):7.0f} ms after navigation "
              f"(runs: {', '.join(f'{v:.0f}' for v in loaded)})")
        print(f"all {args.slices} frames fetched by the page, 6 at a time:")
        for name, (elapsed, total) in (("raw native frames (viewer's choice)", raw),
                                       ("server-rendered PNG", png), ("server-rendered JPEG", jpeg)):
            print(f"  {name:38s} {elapsed:7.0f} ms  {total / 1e6:6.1f} MB  "
                  f"{args.slices / elapsed * 1000:6.0f} frames/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
