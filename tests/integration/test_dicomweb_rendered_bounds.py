"""Rendered and thumbnail requests against a real server on loopback (in this process, so
its memory is this process's): a frame over the render limit is refused before anything
is decoded, the viewport is bounded, a repeated render comes from the cache without
reading the stored object, and a frame render decodes that frame only."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels.utils import pixel_array
from pydicom.uid import RLELossless, generate_uid

from storage import InstanceRecord
from tests.support.dicomweb_server import TOKEN, DicomwebServer

PNG = {"Authorization": f"Bearer {TOKEN}", "Accept": "image/png"}

# A 2-frame 8192 x 8192 16-bit image of zeros in JPEG-LS: a few kilobytes stored, 128 MiB
# a frame decoded. Made in a child process so that building it costs this one nothing.
_BOMB = """
import sys
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, SecondaryCaptureImageStorage, generate_uid
ds = Dataset()
ds.file_meta = FileMetaDataset()
ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
ds.PatientID, ds.Modality = "BOMB", "OT"
ds.Rows = ds.Columns = 8192
ds.NumberOfFrames = 2
ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
ds.PixelData = np.zeros((2, 8192, 8192), np.uint16).tobytes()
ds.compress(JPEGLSLossless)
ds.save_as(sys.argv[1], enforce_file_format=True)
"""


def _peak_rss_kib() -> int:
    """This process's peak resident set since the last `_reset_peak_rss` (VmHWM)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)[1])  # type: ignore[index]


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM back to the current RSS


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomwebServer]:
    with DicomwebServer(tmp_path_factory.mktemp("rendered")) as running:
        yield running


def _store(server: DicomwebServer, dataset: Dataset, name: str,
           indexed_matrix: bool = True) -> str:
    """The dataset written to the store and indexed (as the worker would, minus the
    pipeline); `indexed_matrix=False`: an index row without Rows/Columns (older rows).
    Returns its instance URL."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    body = buffer.getvalue()
    key = f"tests/{name}.dcm"
    server.store.put(key, body)
    record = InstanceRecord.from_dataset(
        dataset, object_key=key, size_bytes=len(body), sha256=hashlib.sha256(body).hexdigest(),
        transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID), site_id="site1")
    if not indexed_matrix:
        record = dataclasses.replace(record, instance={**record.instance, "rows": None,
                                                       "columns": None})
    server.index.upsert_instance(record)
    return (f"{server.url}/studies/{dataset.StudyInstanceUID}/series/{dataset.SeriesInstanceUID}"
            f"/instances/{dataset.SOPInstanceUID}")


def _with_new_uids(dataset: Dataset) -> Dataset:
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return dataset


def _cache_lookups(server: DicomwebServer, outcome: str) -> float:
    text = httpx.get(f"{server.root}/metrics/").text
    found = re.search(
        rf'^dicom_gateway_rendered_cache_lookups_total{{outcome="{outcome}"}} (\S+)$', text,
        re.MULTILINE)
    return float(found[1]) if found else 0.0


def test_a_frame_over_the_render_limit_is_refused_before_anything_is_decoded(
        server: DicomwebServer, tmp_path: Path) -> None:
    """A small stored instance declaring 8192 x 8192 x 2 frames: every rendered and
    thumbnail resource of it is a 422 JSON error naming the limit, refused from the index
    row or, without one, from the header — and this process's peak memory does not move,
    where decoding a single frame of it does (the control at the end)."""
    bomb_path = tmp_path / "bomb.dcm"
    subprocess.run([sys.executable, "-c", _BOMB, str(bomb_path)], check=True, timeout=300)
    assert bomb_path.stat().st_size < 64 * 1024
    limits = server.app.state.config.rendering
    assert 8192 * 8192 > limits.max_frame_megapixels * 1_000_000  # the default limit
    bomb = pydicom.dcmread(bomb_path)
    indexed = _store(server, bomb, "bomb")
    header_only = _store(server, _with_new_uids(pydicom.dcmread(bomb_path)), "bomb-unindexed",
                         indexed_matrix=False)
    resources = [f"{base}/{resource}" for base in (indexed, header_only) for resource in (
        "rendered", "frames/1/rendered", "frames/2/rendered?viewport=64,64", "thumbnail",
        "frames/1,2/thumbnail")]
    resources.append(f"{server.url}/studies/{bomb.StudyInstanceUID}/thumbnail")

    _reset_peak_rss()
    before = _peak_rss_kib()
    for url in resources:
        answer = httpx.get(url, headers=PNG, timeout=60)
        assert answer.status_code == 422, (url, answer.text)
        error = answer.json()["error"]
        assert error["code"] == "too_large_to_render"
        assert f"{limits.max_frame_megapixels:g} megapixels" in error["message"]
    rendered_series = httpx.get(f"{server.url}/studies/{bomb.StudyInstanceUID}/rendered",
                                headers=PNG, timeout=60)
    assert rendered_series.status_code == 422 and rendered_series.json()["error"]["code"]
    grown = _peak_rss_kib() - before
    assert grown < 32 * 1024, f"peak memory grew by {grown} KiB"

    # Control: the measurement sees one frame decoded (so it would have seen a render).
    _reset_peak_rss()
    before = _peak_rss_kib()
    frame = pixel_array(bomb, index=0)
    assert frame.shape == (8192, 8192)
    assert _peak_rss_kib() - before > 100 * 1024
    # The server answers normally right after.
    assert httpx.get(f"{server.url}/studies", headers={"Authorization": f"Bearer {TOKEN}"}
                     ).status_code == 200


def _rle_frames(frames: int = 3, size: int = 64) -> Dataset:
    """An RLE Lossless MR-like instance whose frames differ (a bright band lower in each)."""
    from pydicom.data import get_testdata_file

    dataset = pydicom.dcmread(get_testdata_file("emri_small.dcm"))  # 64 x 64 x 10, 16 bits
    pixels = np.tile(np.arange(size, dtype=np.uint16) * 4, (frames, size, 1))
    for n in range(frames):
        pixels[n, n * 8 : n * 8 + 8] = 1000
    dataset.NumberOfFrames = frames
    dataset.Rows = dataset.Columns = size
    dataset.compress(RLELossless, pixels)
    return _with_new_uids(dataset)


def test_the_viewport_and_other_render_parameters_are_bounded(server: DicomwebServer) -> None:
    base = _store(server, _rle_frames(), "viewport")
    for query in ("viewport=4097,64", "viewport=64,100000", "viewport=0,64", "viewport=-1,64",
                  "viewport=64", "quality=0", "quality=101", "quality=1e9", "window=nan,400",
                  "window=40,inf", "window=40,0", "window=40,1e999"):
        for resource in ("rendered", "frames/1/rendered", "thumbnail"):
            answer = httpx.get(f"{base}/{resource}?{query}", headers=PNG)
            assert answer.status_code == 400, (resource, query)
            assert answer.json()["error"]["code"] == "bad_request"
    largest = httpx.get(f"{base}/rendered?viewport=4096,4096", headers=PNG)
    assert largest.status_code == 200
    assert Image.open(io.BytesIO(largest.content)).size == (64, 64)  # shrunk, never enlarged


def test_a_repeated_render_is_served_from_the_cache_without_reading_the_object(
        server: DicomwebServer) -> None:
    """The second identical request is a cache hit (counted in /metrics) and answers the
    same bytes even with the stored object's content destroyed (same size: only its
    presence is looked up); another window, frame or media type is a new render, which
    reads the object and finds it damaged; with the object gone, even a cached image is a
    404 (an indexed object gone is never served)."""
    dataset = _rle_frames()
    base = _store(server, dataset, "cached")
    url = f"{base}/frames/2/rendered?window=150,100&viewport=32,32"
    hits, misses = _cache_lookups(server, "hit"), _cache_lookups(server, "miss")
    first = httpx.get(url, headers=PNG)
    assert first.status_code == 200
    assert (_cache_lookups(server, "hit"), _cache_lookups(server, "miss")) == (hits, misses + 1)

    object_path = server.store.root / "tests" / "cached.dcm"
    object_path.write_bytes(bytes(object_path.stat().st_size))  # zeros: no DICOM left in it
    again = httpx.get(url, headers=PNG)
    assert again.status_code == 200 and again.content == first.content
    assert _cache_lookups(server, "hit") == hits + 1
    for other, accept in ((url.replace("window=150,100", "window=150,200"), PNG),
                          (url.replace("frames/2", "frames/3"), PNG),
                          (url, {**PNG, "Accept": "image/jpeg"})):
        answer = httpx.get(other, headers=accept)
        assert answer.status_code == 500 and answer.json()["error"]["code"] == "internal_error"
    object_path.unlink()
    gone = httpx.get(url, headers=PNG)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"


def test_a_frame_render_decodes_that_frame_only(server: DicomwebServer) -> None:
    """Frame 1's compressed bitstream is damaged: frames 2 and 3 still render (they are
    decoded alone), frame 1 does not."""
    dataset = _rle_frames()
    fragments = list(generate_frames(dataset.PixelData, number_of_frames=3))
    fragments[0] = b"\x01\x00\x00\x00" + b"\xff" * 60  # an RLE header announcing nothing sane
    dataset.PixelData = encapsulate(fragments)
    base = _store(server, dataset, "damaged")
    images = []
    for frame in (2, 3):
        answer = httpx.get(f"{base}/frames/{frame}/rendered", headers=PNG)
        assert answer.status_code == 200, answer.text
        images.append(np.asarray(Image.open(io.BytesIO(answer.content))))
    assert not np.array_equal(images[0], images[1])
    broken = httpx.get(f"{base}/frames/1/rendered", headers=PNG)
    assert broken.status_code == 404 and broken.json()["error"]["code"] == "not_found"
