"""The viewer's pixels against an independent reference: for real test images of every kind
(signed 16-bit CT with rescale, MR, 8-bit, MONOCHROME1, RGB interleaved and planar,
YBR_FULL JPEG, RLE, multi-frame), the browser's rendering of the first frame at native size
equals the PS3.3 C.11.2 pipeline computed here with numpy (modality LUT, linear window,
presentation), or pydicom's own colour decoding."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from imaging import Codec, TranscodeStatus, transcode_lossless
from tests.support.dicomweb_server import TOKEN, DicomwebServer

playwright_api = pytest.importorskip("playwright.sync_api")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _monochrome1() -> Dataset:
    dataset = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    dataset.PhotometricInterpretation = "MONOCHROME1"
    return dataset


def _planar_rgb() -> Dataset:
    dataset = pydicom.dcmread(get_testdata_file("SC_rgb_small_odd.dcm"))
    planes = dataset.pixel_array.transpose(2, 0, 1).copy()
    dataset.PlanarConfiguration = 1
    dataset.PixelData = planes.tobytes()
    return dataset


def _stored_as(codec: Codec, name: str, bits_stored: int | None = None) -> Callable[[], Dataset]:
    """A test image compressed as the pipeline stores it (its frames are then decoded in the
    browser, by the vendored WebAssembly codecs); with `bits_stored`, narrowed first, the
    values shifted to be signed around 0 (sign extension is then the browser's work)."""
    def load() -> Dataset:
        dataset = pydicom.dcmread(get_testdata_file(name))
        if bits_stored is not None:
            values = dataset.pixel_array.astype(np.int32) - 1200  # both signs, within 12 bits
            dataset.BitsStored, dataset.HighBit = bits_stored, bits_stored - 1
            dataset.PixelData = values.astype(np.int16).tobytes()
        outcome = transcode_lossless(dataset, codec)
        assert outcome.status is TranscodeStatus.COMPRESSED, outcome
        return dataset
    return load


CASES = {
    "ct-signed-htj2k": _stored_as(Codec.HTJ2K, "CT_small.dcm"),
    "ct-signed-12bit-htj2k": _stored_as(Codec.HTJ2K, "CT_small.dcm", bits_stored=12),
    "ct-signed-12bit-jpegls": _stored_as(Codec.JPEG_LS, "CT_small.dcm", bits_stored=12),
    "mr-jpegls": _stored_as(Codec.JPEG_LS, "MR_small.dcm"),
    # Enhanced CT: window (W102/L49) and rescale only in its shared functional groups.
    "enhanced-ct-groups": lambda: pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm")),
    "palette-colour": lambda: pydicom.dcmread(get_testdata_file("OBXXXX1A.dcm")),
    "ct-signed-rescale": lambda: pydicom.dcmread(get_testdata_file("CT_small.dcm")),
    "mr-16bit": lambda: pydicom.dcmread(get_testdata_file("MR_small.dcm")),
    "monochrome1": _monochrome1,
    "8bit-jpegls": lambda: pydicom.dcmread(get_testdata_file("JPEGLSNearLossless_08.dcm")),
    "rgb-interleaved": lambda: pydicom.dcmread(get_testdata_file("SC_rgb_small_odd.dcm")),
    "rgb-planar": _planar_rgb,
    "ybr-full-jpeg": lambda: pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")),
    "rgb-rle-2frame": lambda: pydicom.dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm")),
}


def _expected(dataset: Dataset) -> np.ndarray:
    """RGBA-less expected rendering (rows x cols x 3) of frame 1."""
    array = dataset.pixel_array
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        array = array[0]
    if dataset.PhotometricInterpretation == "PALETTE COLOR":
        return (pydicom.pixels.apply_color_lut(array, dataset) / 257).astype(np.float64)
    if int(dataset.SamplesPerPixel) == 3:
        if dataset.PhotometricInterpretation.startswith("YBR") and not dataset.file_meta.TransferSyntaxUID.is_compressed:
            array = pydicom.pixels.convert_color_space(array, dataset.PhotometricInterpretation, "RGB")
        return array.astype(np.float64)
    source: Dataset = dataset
    if "SharedFunctionalGroupsSequence" in dataset:  # enhanced: frame 1's functional groups
        source = Dataset()
        for groups in (dataset.SharedFunctionalGroupsSequence[0],
                       dataset.PerFrameFunctionalGroupsSequence[0]):
            for name in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
                if name in groups:
                    source.update(groups[name][0])
    values = array.astype(np.float64) * float(source.get("RescaleSlope", 1) or 1) + float(source.get("RescaleIntercept", 0) or 0)
    if "WindowCenter" in source and "WindowWidth" in source:
        center = float(np.atleast_1d(source.WindowCenter)[0])
        width = float(np.atleast_1d(source.WindowWidth)[0])
    else:
        low, high = values.min(), values.max()
        center, width = (low + high) / 2, max(1.0, high - low)
    # PS3.3 C.11.2.1.2.1, output 0..255
    y = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255
    y = np.where(values <= center - 0.5 - (width - 1) / 2, 0, y)
    y = np.where(values > center - 0.5 + (width - 1) / 2, 255, y)
    y = np.clip(y, 0, 255)
    if dataset.PhotometricInterpretation == "MONOCHROME1":
        y = 255 - y
    return np.repeat(y[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DicomwebServer, dict[str, str]]]:
    """The test images put straight into the archive (as the pipeline would after
    de-identification), one study each."""
    with DicomwebServer(tmp_path_factory.mktemp("pixels")) as running:
        studies = {}
        for name, load in CASES.items():
            studies[name] = running.archive(load())
        yield running, studies


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
        yield launched
        launched.close()


@pytest.mark.parametrize("name", list(CASES))
def test_rendering_matches_the_standard_pipeline(server: tuple[DicomwebServer, dict[str, str]],
                                                 browser: Any, name: str) -> None:
    running, studies = server
    created = httpx.post(f"{running.root}/api/shares", headers={"Authorization": f"Bearer {TOKEN}"},
                         json={"study_uids": [studies[name]], "expires_in": 600}).json()
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(created["url"])
    page.wait_for_function("() => window.dgwViewer && window.dgwViewer.timings.firstImage !== undefined", timeout=20_000)
    if name.endswith("-htj2k") or name.endswith("-jpegls") and not name.startswith("8bit"):
        # The first image may come decoded by the server while the browser's decoder starts:
        # once it has, the frame is fetched again as stored and decoded here.
        codec = "htj2k" if name.endswith("htj2k") else "jls"
        decoded = page.evaluate("""async (codec) => {
          const app = window.dgwViewer.app, viewport = app.viewports[0];
          while (!app.api.decoders.isReady(codec)) await new Promise((r) => setTimeout(r, 20));
          app.cache.frames.clear(); viewport.stack.pending.clear();
          await viewport.render();
          return app.api.decoders.decoded;
        }""", codec)
        assert decoded >= 1  # this rendering is the browser's decoding
    rendered = page.evaluate("""() => {
      const c = window.dgwViewer.app.viewports[0].offscreen;
      return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];
    }""")
    markers = page.evaluate("() => Object.fromEntries(Object.entries(window.dgwViewer.app.viewports[0].markers)"
                            ".map(([edge, node]) => [edge, node.textContent]))")
    overlay = page.locator(".overlay.bl").first.inner_text()
    page.close()
    if name == "enhanced-ct-groups":  # Image Orientation (Patient) -1\0\0\0\1\0: mirrored
        assert markers == {"left": "L", "right": "R", "top": "A", "bottom": "P"}
        assert "W 102  L 49" in overlay
    elif name.startswith("ct-"):  # 1\0\0\0\1\0, the usual axial view from the feet
        assert markers == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    width, height, data = rendered
    got = np.array(data, dtype=np.float64).reshape(height, width, 4)[..., :3]
    expected = _expected(CASES[name]())
    assert got.shape == expected.shape
    difference = np.abs(got - expected)
    assert difference.mean() < 1.0 and np.percentile(difference, 99) <= 2, (name, difference.mean())
    assert errors == []
