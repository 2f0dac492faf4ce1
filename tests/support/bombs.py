"""Decompression bombs: small files declaring huge pixel matrices, built as an attacker
would (real Part 10 files, streamed so the test process never holds the decoded size)."""

from __future__ import annotations

import struct
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def image_header(rows: int, columns: int, frames: int, *, study: str | None = None) -> Dataset:
    """A CT-like data set without its pixel data, declaring rows x columns x frames (16 bit)."""
    dataset = Dataset()
    dataset.SOPClassUID = CT_IMAGE_STORAGE
    dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID = study or generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.PatientID = "BOMB-1"
    dataset.PatientName = "Bomb^Test"
    dataset.Modality = "CT"
    dataset.Rows, dataset.Columns = rows, columns
    if frames > 1:
        dataset.NumberOfFrames = frames
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
    dataset.PixelRepresentation = 0
    return dataset


def _file_meta(dataset: Dataset, syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.9.7433.1.1"
    return meta


def _part10_prefix(dataset: Dataset, syntax: str) -> bytes:
    """Preamble and file meta, as pydicom writes them."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, _file_meta(dataset, syntax), enforce_standard=True)
    return b"\0" * 128 + b"DICM" + buffer.getvalue()


def deflated_bomb(path: Path, rows: int = 8192, columns: int = 8192, frames: int = 2, *,
                  study: str | None = None) -> Dataset:
    """Deflated Explicit VR Little Endian of zeros declaring rows x columns x frames x 16 bit
    (8192x8192x2: 256 MiB inflated, about 250 KB on disk). Returns its header."""
    header = image_header(rows, columns, frames, study=study)
    encoded = BytesIO()
    plain = Dataset()
    plain.update(header)
    plain.save_as(encoded, enforce_file_format=False, implicit_vr=False, little_endian=True)
    length = rows * columns * frames * 2
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with path.open("wb") as handle:
        handle.write(_part10_prefix(header, DeflatedExplicitVRLittleEndian))
        handle.write(compressor.compress(encoded.getvalue()))
        handle.write(compressor.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length)))
        zeros = bytes(16 * 1024 * 1024)
        left = length
        while left:
            chunk = min(left, len(zeros))
            handle.write(compressor.compress(zeros[:chunk]))
            left -= chunk
        handle.write(compressor.flush())
    return header


def normal_deflated(path: Path, rows: int = 64, columns: int = 64, frames: int = 1) -> Dataset:
    """An ordinary deflated instance (random pixels), written by pydicom."""
    dataset = image_header(rows, columns, frames)
    pixels = np.random.default_rng(7).integers(0, 4096, (frames, rows, columns), dtype=np.uint16)
    dataset.PixelData = pixels.tobytes()
    dataset.file_meta = _file_meta(dataset, DeflatedExplicitVRLittleEndian)
    dataset.save_as(path, enforce_file_format=True)
    return dataset


def compressed_bomb(path: Path, syntax: str, rows: int = 65535, columns: int = 65535,
                    frames: int = 1) -> Dataset:
    """A tiny JPEG-LS or RLE stream (one 8x8 frame) in an instance declaring a huge matrix."""
    dataset = image_header(rows, columns, frames)
    small = np.zeros((8, 8), dtype=np.uint16)
    if syntax == JPEGLSLossless:
        import jpeg_ls

        frame = bytes(jpeg_ls.encode(small))
    elif syntax == RLELossless:
        from pydicom.encaps import generate_frames

        tiny = image_header(8, 8, 1)
        tiny.compress(RLELossless, small, generate_instance_uid=False)  # pydicom's own RLE
        [frame] = generate_frames(tiny.PixelData, number_of_frames=1)
    else:
        raise ValueError(f"no bomb for {syntax}")
    dataset.PixelData = encapsulate([frame] * frames)
    dataset["PixelData"].VR = "OB"
    dataset.file_meta = _file_meta(dataset, syntax)
    dataset.save_as(path, enforce_file_format=True)
    return dataset


def read_header(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)
