"""Declared sizes checked before decoding: real bombs (deflate, JPEG-LS, RLE), real files."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEGLSLossless, RLELossless

from anonymize import DeidentificationPolicy, PseudonymKeys
from gateway.sample_study import SampleStudySpec, write_sample_study
from imaging import (
    DeclaredSize,
    DecodeLimitExceeded,
    DecodeLimits,
    check_declared,
    decompress_for_serving,
    read_bounded,
)
from storage import FilesystemObjectStore, IndexRepository, create_index_engine, migrate
from tests.support.bombs import compressed_bomb, deflated_bomb, normal_deflated
from worker import IngestPipeline

SMALL = DecodeLimits.from_mib(64, 64)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.dcm"
    deflated_bomb(path)
    return path


def test_the_deflate_bomb_is_small_and_declares_256_mib(bomb: Path) -> None:
    assert bomb.stat().st_size < 400_000
    header = read_bounded(bomb, stop_before_pixels=True, check=False)
    assert DeclaredSize.from_dataset(header).instance_bytes == 8192 * 8192 * 2 * 2


def test_a_deflate_bomb_over_the_limits_is_refused_naming_its_sizes(bomb: Path) -> None:
    with pytest.raises(DecodeLimitExceeded, match=r"128\.0 MiB.*8192x8192.*64\.0 MiB per frame"):
        read_bounded(bomb, SMALL)


def test_a_deflated_stream_longer_than_its_declaration_stops_there(tmp_path: Path) -> None:
    path = tmp_path / "liar.dcm"
    deflated_bomb(path, rows=1024, columns=1024, frames=70)  # 140 MiB of zeros
    data = bytearray(path.read_bytes())
    # the header now declares 16 rows: the stream holds far more than that
    header = read_bounded(path, stop_before_pixels=True, check=False)
    assert int(header.Rows) == 1024
    liar = tmp_path / "declared-small.dcm"
    deflated_bomb(liar, rows=16, columns=16, frames=1)
    small_prefix = liar.read_bytes()
    assert small_prefix != bytes(data)
    with pytest.raises(DecodeLimitExceeded, match="per instance"):
        read_bounded(path, DecodeLimits.from_mib(100, 64))


def test_a_normal_deflated_instance_reads_as_pydicom_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "normal.dcm"
    normal_deflated(path, rows=64, columns=48, frames=3)
    ours, theirs = read_bounded(path, SMALL), pydicom.dcmread(path)
    assert str(ours.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.1.99"
    assert ours.SOPInstanceUID == theirs.SOPInstanceUID
    assert np.array_equal(ours.pixel_array, theirs.pixel_array)


@pytest.mark.parametrize("name", ["emri_small.dcm", "SC_rgb_rle_2frame.dcm", "emri_small_RLE.dcm",
                                  "JPEGLSNearLossless_08.dcm", "SC_rgb_gdcm_KY.dcm",
                                  "image_dfl.dcm", "US1_J2KR.dcm"])
def test_real_files_pass_and_decode(name: str) -> None:
    path = get_testdata_file(name)
    assert path is not None
    dataset = read_bounded(Path(path))
    declared = check_declared(dataset)
    assert declared.instance_bytes > 0
    if dataset.file_meta.TransferSyntaxUID.is_compressed:
        decompress_for_serving(dataset)
    assert dataset.pixel_array.size > 0


@pytest.mark.parametrize("syntax", [JPEGLSLossless, RLELossless])
def test_a_tiny_compressed_stream_declaring_a_huge_matrix_is_refused(tmp_path: Path,
                                                                     syntax: str) -> None:
    path = tmp_path / "bomb.dcm"
    compressed_bomb(path, syntax)
    assert path.stat().st_size < 10_000
    with pytest.raises(DecodeLimitExceeded, match="65535x65535"):
        read_bounded(path)
    dataset = pydicom.dcmread(path)
    with pytest.raises(DecodeLimitExceeded):
        decompress_for_serving(dataset)


def test_an_encapsulated_stream_with_more_frames_than_declared_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "frames.dcm"
    compressed_bomb(path, JPEGLSLossless, rows=8, columns=8, frames=3)
    dataset = pydicom.dcmread(path)
    del dataset.NumberOfFrames  # one frame declared, three in the offset table
    with pytest.raises(DecodeLimitExceeded, match="lists 3 frames, the instance declares 1"):
        check_declared(dataset)


def test_a_codestream_larger_than_the_declared_matrix_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "codestream.dcm"
    compressed_bomb(path, JPEGLSLossless, rows=8, columns=8)
    dataset = pydicom.dcmread(path)
    dataset.Rows = dataset.Columns = 4
    with pytest.raises(DecodeLimitExceeded, match="codestream declares 8x8"):
        check_declared(dataset)


def test_the_worker_quarantines_a_bomb_with_its_sizes_and_stores_the_rest(
        tmp_path: Path, bomb: Path) -> None:
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    migrate(engine)
    pipeline = IngestPipeline(
        store=FilesystemObjectStore(tmp_path / "objects"), index=IndexRepository(engine),
        policy=DeidentificationPolicy(PseudonymKeys(b"limits-test-secret-0123456789abcdef"), "site1"),
        spool_root=tmp_path / "spool", quarantine_root=tmp_path / "quarantine",
        decode_limits=SMALL)
    batch = tmp_path / "spool" / "site1" / "b1"
    batch.mkdir(parents=True)
    shutil.copy(bomb, batch / "bomb.dcm")
    normal_deflated(batch / "normal.dcm")
    report = pipeline.ingest_batch("site1", "b1")
    assert (report.stored, report.quarantined) == (1, 1)
    reason = json.loads((tmp_path / "quarantine" / "site1" / "b1" / "bomb.dcm.reason.json")
                        .read_text())
    assert reason["reason"] == "DecodeLimitExceeded"
    assert reason["failure_reason"] == 0xA700
    assert "8192x8192" in reason["explanation"] and "BOMB" not in reason["explanation"]
    assert reason["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.2"


def test_the_worker_stores_deflated_instances_exactly(tmp_path: Path) -> None:
    """Deflated instances under the limits — one written by dcmtk's dcmconv (+td), one of
    zeros declaring 48 MiB in 3 frames — are stored compressed, pixel for pixel."""
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    migrate(engine)
    store = FilesystemObjectStore(tmp_path / "objects")
    pipeline = IngestPipeline(
        store=store, index=IndexRepository(engine),
        policy=DeidentificationPolicy(PseudonymKeys(b"limits-test-secret-0123456789abcdef"), "site1"),
        spool_root=tmp_path / "spool", quarantine_root=tmp_path / "quarantine",
        decode_limits=SMALL)
    batch = tmp_path / "spool" / "site1" / "b1"
    batch.mkdir(parents=True)
    [ct] = write_sample_study(tmp_path / "src", SampleStudySpec(ct_slices=1, mr_slices=0, ct_size=256))
    subprocess.run(["dcmconv", "+td", str(ct), str(batch / "dcmtk.dcm")], check=True)
    deflated_bomb(batch / "zeros.dcm", 4096, 2048, 3)
    expected = {"dcmtk": pydicom.dcmread(ct).pixel_array, "zeros": np.zeros((3, 4096, 2048))}

    report = pipeline.ingest_batch("site1", "b1")

    assert (report.stored, report.quarantined) == (2, 0)
    rows = list(IndexRepository(engine).iter_instance_rows())
    assert len(rows) == 2
    for _, key, _ in rows:
        stored = pydicom.dcmread(io.BytesIO(store.get(key)))
        assert stored.file_meta.TransferSyntaxUID.is_compressed
        source = "zeros" if int(stored.Rows) == 4096 else "dcmtk"
        assert np.array_equal(stored.pixel_array, expected[source])
