"""Declared sizes, checked before anything is decoded or allocated.

An instance says how large its pixels are: Rows x Columns x Number of Frames x Samples per
Pixel x Bits Allocated. Every decoder (deflate, JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE)
produces what the data set or its codestream declares, so a few kilobytes can declare
gigabytes. `check_declared` refuses a declaration above the configured `DecodeLimits` —
and an encapsulated stream claiming more frames, or larger frames, than declared — before
any decoder runs; `read_bounded` reads a Part 10 file as `pydicom.dcmread` does, but
inflates a Deflated Explicit VR Little Endian data set only up to its declared size.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from pydicom import dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import generate_fragments, parse_basic_offsets
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset, read_preamble
from pydicom.pixels.utils import _get_jpg_parameters
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian

__all__ = [
    "DEFAULT_DECODE_LIMITS",
    "DeclaredSize",
    "DecodeLimitExceeded",
    "DecodeLimits",
    "check_declared",
    "read_bounded",
]

MIB = 1024 * 1024
#: Elements a deflated data set may hold beside its pixels (header, trailing padding).
_NON_PIXEL_ALLOWANCE = 64 * MIB
_INFLATE_STEP = 1 * MIB
_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # Float, Double Float, Pixel Data
_EXTENDED_OFFSET_TABLE = 0x7FE00001


@dataclass(frozen=True)
class DecodeLimits:
    """Largest decoded size accepted for one instance and for one of its frames."""

    max_instance_bytes: int = 1024 * MIB
    max_frame_bytes: int = 256 * MIB

    @classmethod
    def from_mib(cls, instance_mib: int, frame_mib: int) -> DecodeLimits:
        return cls(instance_mib * MIB, frame_mib * MIB)


DEFAULT_DECODE_LIMITS = DecodeLimits()


class DecodeLimitExceeded(ValueError):
    """An instance declares (or inflates to) more than the limits allow: refused before it
    is decoded. The message names sizes only, never a value of the instance."""


@dataclass(frozen=True)
class DeclaredSize:
    """What an instance's Image Pixel module says its decoded pixels take."""

    rows: int = 0
    columns: int = 0
    frames: int = 0
    samples_per_pixel: int = 0
    bits_allocated: int = 0

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> DeclaredSize:
        """The declaration of `dataset` (all zero without pixel data). Raises
        DecodeLimitExceeded for a declaration that is no size (negative, not a number)."""
        if "Rows" not in dataset and not any(tag in dataset for tag in _PIXEL_TAGS):
            return cls()  # a header read without its pixels still declares their size
        rows = _declared_int(dataset, "Rows", 0)
        columns = _declared_int(dataset, "Columns", 0)
        frames = _declared_int(dataset, "NumberOfFrames", 1) or 1
        samples = _declared_int(dataset, "SamplesPerPixel", 1)
        bits = _declared_int(dataset, "BitsAllocated", 0)
        return cls(rows, columns, frames, samples, bits)

    @property
    def frame_bytes(self) -> int:
        return math.ceil(
            self.rows * self.columns * self.samples_per_pixel * self.bits_allocated / 8
        )

    @property
    def instance_bytes(self) -> int:
        return math.ceil(
            self.rows
            * self.columns
            * self.samples_per_pixel
            * self.bits_allocated
            * self.frames
            / 8
        )

    def describe(self) -> str:
        return (
            f"{self.rows}x{self.columns} pixels x {self.frames} frames x "
            f"{self.samples_per_pixel} samples x {self.bits_allocated} bits"
        )


def _declared_int(dataset: Dataset, keyword: str, default: int) -> int:
    try:
        value = dataset.get(keyword, None)
        number = default if value is None or value == "" else int(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DecodeLimitExceeded(f"{keyword} is not a size") from exc
    if number < 0:
        raise DecodeLimitExceeded(f"{keyword} is negative")
    return number


def _mib(size: int) -> str:
    return f"{size / MIB:,.1f} MiB"


def check_declared(dataset: Dataset, limits: DecodeLimits = DEFAULT_DECODE_LIMITS) -> DeclaredSize:
    """The declared size of `dataset`, once checked against `limits`: per instance, per
    frame, Rows and Columns at most 65535, and — for encapsulated pixel data already read —
    no more frames in its offset tables, nor larger frames in its codestream headers, than
    declared. Raises DecodeLimitExceeded."""
    declared = DeclaredSize.from_dataset(dataset)
    if declared.rows > 0xFFFF or declared.columns > 0xFFFF:
        raise DecodeLimitExceeded(
            f"the instance declares {declared.rows}x{declared.columns} "
            "pixels: Rows and Columns are at most 65535"
        )
    if declared.frame_bytes > limits.max_frame_bytes:
        raise DecodeLimitExceeded(
            f"a frame declares {_mib(declared.frame_bytes)} decoded ({declared.describe()}), "
            f"above the limit of {_mib(limits.max_frame_bytes)} per frame"
        )
    if declared.instance_bytes > limits.max_instance_bytes:
        raise DecodeLimitExceeded(
            f"the instance declares {_mib(declared.instance_bytes)} decoded "
            f"({declared.describe()}), above the limit of {_mib(limits.max_instance_bytes)} "
            "per instance"
        )
    _check_encapsulated(dataset, declared)
    return declared


def _loaded_value(dataset: Dataset, tag: int) -> bytes | None:
    """The bytes of an element already in memory (a deferred or absent one: None)."""
    if tag not in dataset:
        return None
    element: DataElement | RawDataElement = dataset.get_item(tag)
    value: Any = element.value
    return bytes(value) if isinstance(value, bytes | bytearray) else None


def _check_encapsulated(dataset: Dataset, declared: DeclaredSize) -> None:
    """Offset tables and codestream headers of encapsulated Pixel Data against the
    declaration (decoders allocate what the codestream says, not what the data set says)."""
    if 0x7FE00010 not in dataset:
        return
    element = dataset.get_item(0x7FE00010)
    undefined = (
        element.length == 0xFFFFFFFF
        if isinstance(element, RawDataElement)
        else bool(element.is_undefined_length)
    )
    pixel_data = _loaded_value(dataset, 0x7FE00010)
    if not undefined or pixel_data is None:
        return
    try:
        offsets = parse_basic_offsets(pixel_data)
    except (ValueError, struct.error):
        return  # a malformed table: the decoder reports it
    if len(offsets) > declared.frames:
        raise DecodeLimitExceeded(
            f"the encapsulated pixel data lists {len(offsets)} frames, "
            f"the instance declares {declared.frames}"
        )
    extended = _loaded_value(dataset, _EXTENDED_OFFSET_TABLE)
    if extended is not None and len(extended) // 8 > declared.frames:
        raise DecodeLimitExceeded(
            f"the extended offset table lists {len(extended) // 8} "
            f"frames, the instance declares {declared.frames}"
        )
    fragments = generate_fragments(pixel_data[8 + 4 * len(offsets) :])
    while True:
        try:
            fragment = next(fragments)
        except (StopIteration, ValueError, struct.error):
            return  # the end, or a malformed item the decoder reports
        _check_codestream_header(fragment, declared)


def _check_codestream_header(fragment: bytes, declared: DeclaredSize) -> None:
    """A fragment that starts a JPEG/JPEG-LS or JPEG 2000/HTJ2K codestream may not declare
    a larger image than the instance."""
    height = width = 0
    if fragment[:2] == b"\xff\xd8":  # SOI
        parameters = _get_jpg_parameters(fragment)
        height, width = int(parameters.get("height", 0)), int(parameters.get("width", 0))
    elif fragment[:4] == b"\xff\x4f\xff\x51" and len(fragment) >= 24:  # SOC, SIZ
        width_grid, height_grid, x_offset, y_offset = struct.unpack(">IIII", fragment[8:24])
        width, height = width_grid - x_offset, height_grid - y_offset
    if height > declared.rows or width > declared.columns:
        raise DecodeLimitExceeded(
            f"a frame's codestream declares {height}x{width} pixels, the instance "
            f"{declared.rows}x{declared.columns}"
        )


# Reading ------------------------------------------------------------------------------
def _not_file_meta(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return tag >> 16 != 2


def _at_pixel_data(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return tag in _PIXEL_TAGS


def read_bounded(
    source: Path | str | bytes,
    limits: DecodeLimits = DEFAULT_DECODE_LIMITS,
    *,
    stop_before_pixels: bool = False,
    check: bool = True,
    inflate_pixels: bool = True,
) -> FileDataset:
    """A Part 10 file (path or bytes) read as `pydicom.dcmread` reads it, its declared size
    checked (`check_declared`). A Deflated Explicit VR Little Endian data set is inflated
    step by step: up to its pixel data first, whose declaration is then checked, then up to
    the declared size — never further. Raises DecodeLimitExceeded, or what pydicom raises
    for an unreadable file. With `check` False (a header read, `stop_before_pixels`), an
    over-limit declaration is read, not refused: inflating still stops at the pixel data.
    With `inflate_pixels` False, a deflated data set is read up to its pixel data only (a
    plain one as `stop_before_pixels` says): a small deflated file may hold gigabytes."""
    with open(source, "rb") if isinstance(source, Path | str) else io.BytesIO(source) as handle:
        preamble = read_preamble(handle, force=False)
        file_meta = FileMetaDataset(
            read_dataset(
                handle, is_implicit_VR=False, is_little_endian=True, stop_when=_not_file_meta
            )
        )
        if str(file_meta.get("TransferSyntaxUID", "")) != DeflatedExplicitVRLittleEndian:
            handle.seek(0)
            return _read_plain(handle, limits, stop_before_pixels, check)
        stop_before_pixels = stop_before_pixels or not inflate_pixels
        inflated = _inflate_bounded(
            handle.read(), limits, stop_before_pixels=stop_before_pixels, check=check
        )
    name = str(source) if isinstance(source, Path | str) else "<bytes>"
    buffer = DicomBytesIO(inflated)
    buffer.name = name
    dataset = read_dataset(
        cast(BinaryIO, buffer),
        False,
        True,
        stop_when=_at_pixel_data if stop_before_pixels else None,
    )
    file_meta.set_original_encoding(
        is_implicit_vr=False, is_little_endian=True, character_encoding="iso8859"
    )
    # Named, not given the buffer: a FileDataset keeps its buffer, and this one holds the
    # whole inflated data set again beside the values read from it.
    result = FileDataset(name, dataset, preamble, file_meta, False, True)
    del buffer, inflated
    result.set_original_encoding(False, True, dataset._character_set)
    if check:
        check_declared(result, limits)
    return result


def _read_plain(
    handle: BinaryIO, limits: DecodeLimits, stop_before_pixels: bool, check: bool
) -> FileDataset:
    dataset = dcmread(handle, stop_before_pixels=stop_before_pixels)
    if check:
        check_declared(dataset, limits)
    return dataset


def _inflate_bounded(
    deflated: bytes, limits: DecodeLimits, *, stop_before_pixels: bool, check: bool = True
) -> bytes:
    """The raw-deflate stream inflated up to its pixel data, its declaration checked, then up
    to the end of the declared pixels plus what elements beside them may take (with
    `stop_before_pixels`: only up to its pixel data)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    header_cap = _NON_PIXEL_ALLOWANCE
    inflated = bytearray()
    pending = deflated
    cap: int | None = None
    while True:
        # doubling steps until the pixel data is found: each step parses what came before
        want = max(_INFLATE_STEP, len(inflated)) if cap is None else cap + 1 - len(inflated)
        inflated += inflater.decompress(pending, max(want, 1))
        pending = inflater.unconsumed_tail
        finished = inflater.eof or not pending
        if cap is None:
            pixel_offset = _pixel_data_offset(inflated)
            if pixel_offset is not None:
                header = read_dataset(
                    cast(BinaryIO, DicomBytesIO(bytes(inflated[:pixel_offset]))), False, True
                )
                if stop_before_pixels and not check:
                    return bytes(inflated[:pixel_offset])
                declared = check_declared(header, limits)
                if stop_before_pixels:
                    return bytes(inflated[:pixel_offset])
                cap = pixel_offset + 12 + declared.instance_bytes + 1 + _NON_PIXEL_ALLOWANCE
            elif len(inflated) > header_cap and not finished:
                cap = limits.max_instance_bytes + _NON_PIXEL_ALLOWANCE  # no pixels (yet)
        if cap is not None and len(inflated) > cap:
            raise DecodeLimitExceeded(
                f"the deflated data set inflates past {_mib(cap)}, more than its declared "
                f"size allows (limit {_mib(limits.max_instance_bytes)} per instance)"
            )
        if finished:
            return bytes(inflated)


def _pixel_data_offset(inflated: bytearray) -> int | None:
    """Where the top-level pixel data element starts in a partly inflated Explicit VR Little
    Endian data set; None while the elements before it are not all inflated."""
    buffer = DicomBytesIO(bytes(inflated))
    try:
        read_dataset(cast(BinaryIO, buffer), False, True, stop_when=_at_pixel_data)
    except (EOFError, ValueError, NotImplementedError, struct.error, IndexError, KeyError):
        return None
    position = buffer.tell()
    if position + 4 <= len(inflated) and struct.unpack(
        "<HH", inflated[position : position + 4]
    ) in ((0x7FE0, 0x0008), (0x7FE0, 0x0009), (0x7FE0, 0x0010)):
        return position
    return None
