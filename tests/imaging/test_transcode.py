"""Verified lossless transcoding (imaging.transcode): exact round trips through Part 10 bytes for
every codec, on synthetic and real images, checked by pydicom, dcmdump and dcmtk's dcmdjpls."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames, parse_basic_offsets
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut
from pydicom.pixels.utils import get_j2k_parameters, pixel_array
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from gateway.sample_study import SampleStudySpec, build_sample_study
from imaging import transcode
from imaging.transcode import (
    LOSSLESS_TRANSFER_SYNTAXES,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    Codec,
    TranscodeStatus,
    transcode_lossless,
)

CODECS = list(Codec)
TARGET = {Codec.JPEG_LS: JPEGLSLossless, Codec.JPEG_2000: JPEG2000Lossless,
          Codec.HTJ2K: HTJ2KLossless}


# --- helpers ---------------------------------------------------------------------------------

def _encode(dataset: Dataset) -> bytes:
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _round_trip(dataset: Dataset) -> Dataset:
    return pydicom.dcmread(BytesIO(_encode(dataset)))


def _native(arr: np.ndarray) -> np.ndarray:
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


def _sample_ct() -> Dataset:
    return build_sample_study(SampleStudySpec(ct_slices=1, mr_slices=0))[0]


def _testdata(name: str) -> Path:
    found = get_testdata_file(name)
    assert found is not None, f"pydicom-data has no {name}"
    return Path(str(found))


def _dataset(arr: np.ndarray, photometric: str, bits_stored: int, *, planar: int = 0) -> Dataset:
    """A Secondary Capture dataset holding `arr` (frames first, samples last) uncompressed."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.set_pixel_data(arr, photometric, bits_stored, generate_instance_uid=False)
    if planar:
        # colour-by-plane: each frame is R plane, G plane, B plane
        ds.PlanarConfiguration = 1
        ds.PixelData = np.ascontiguousarray(np.moveaxis(arr, -1, -3)).tobytes()
    assert np.array_equal(ds.pixel_array, arr)  # the fixture itself is right
    return ds


def _smooth(shape: tuple[int, ...], low: int, high: int, seed: int, noise: float) -> np.ndarray:
    """A smooth image with mild noise spanning [low, high] (compressible like a real image)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, shape[0]), np.linspace(0, 1, shape[1]), indexing="ij")
    base = 0.5 + 0.25 * np.sin(6 * xx) * np.cos(4 * yy) + 0.2 * (xx - yy)
    if len(shape) == 3:
        base = np.stack([np.roll(base, 7 * c, axis=1) for c in range(shape[2])], axis=-1)
    values = low + (high - low) * base + rng.normal(0.0, noise, shape)
    return np.clip(np.rint(values), low, high)


def _signed(bits_stored: int, frames: int = 1) -> np.ndarray:
    low, high = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    shape = (frames, 256, 240) if frames > 1 else (256, 240)
    arr = _smooth(shape[-2:], low // 2, high // 2, seed=bits_stored, noise=3.0)
    arr = np.broadcast_to(arr, shape).astype(np.int16).copy()
    flat = arr.reshape(-1)
    flat[:4] = [low, high, -1, 0]  # the extremes and the all-ones pattern
    return arr


def _rgb(frames: int = 1) -> np.ndarray:
    arr = _smooth((192, 200, 3), 0, 255, seed=3, noise=2.0).astype(np.uint8)
    if frames > 1:
        arr = np.stack([np.roll(arr, 5 * f, axis=0) for f in range(frames)])
    return arr


def _transcoded(dataset: Dataset, codec: Codec) -> Dataset:
    outcome = transcode_lossless(dataset, codec)
    assert outcome.status is TranscodeStatus.COMPRESSED, outcome.reason
    assert outcome.stored_transfer_syntax_uid == TARGET[codec]
    assert dataset.file_meta.TransferSyntaxUID == TARGET[codec]
    return dataset


def _assert_exact(codec: Codec, dataset: Dataset, expected: np.ndarray) -> Dataset:
    """Transcode, write Part 10 bytes, read back, decode with pydicom: identical values."""
    _transcoded(dataset, codec)
    return _check_round_trip(codec, dataset, expected)


def _check_round_trip(codec: Codec, dataset: Dataset, expected: np.ndarray) -> Dataset:
    again = _round_trip(dataset)
    assert again.file_meta.TransferSyntaxUID == TARGET[codec]
    assert again["PixelData"].VR == "OB" and again["PixelData"].is_undefined_length
    decoded = again.pixel_array
    assert decoded.shape == expected.shape
    assert decoded.dtype.kind == expected.dtype.kind
    assert np.array_equal(decoded, expected)
    return again


def _codestream_info(codec: Codec, frame: bytes) -> tuple[int, bool | None]:
    """(precision, signed) from the frame header; signedness is None for JPEG-LS (no such field)."""
    if codec is Codec.JPEG_LS:
        assert frame[:4] == b"\xff\xd8\xff\xf7"  # SOI then SOF55 (JPEG-LS)
        return frame[6], None
    assert frame[:4] == b"\xff\x4f\xff\x51"  # raw codestream: SOC then SIZ, not JP2
    info = get_j2k_parameters(frame)
    return int(info["precision"]), bool(info["is_signed"])


def _frames(dataset: Dataset) -> list[bytes]:
    count = int(dataset.get("NumberOfFrames", 1))
    return list(generate_frames(dataset.PixelData, number_of_frames=count))


def _dcmdump_errors(path: Path) -> list[str]:
    if shutil.which("dcmdump") is None:
        pytest.fail("dcmtk's dcmdump is not installed: run `make test` (it installs dcmtk)")
    result = subprocess.run(["dcmdump", "-q", str(path)], check=False, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [line for line in (result.stderr + result.stdout).splitlines() if line.startswith("E:")]


def _comparable(dataset: Dataset) -> dict[Any, Any]:
    """Element values, recursively, byte-order independent (OW etc. as integers), without the
    pixel data, the planar configuration and the retired group lengths."""
    little = dataset.original_encoding[1] is not False
    widths = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
    values: dict[Any, Any] = {}
    for elem in dataset:
        if elem.tag.element == 0 or elem.tag in (0x7FE00010, 0x00280006):
            continue
        if elem.VR == "SQ":
            values[elem.tag] = [_comparable(item) for item in elem.value]
        elif elem.VR in widths and elem.value:
            order = "<" if little else ">"
            values[elem.tag] = np.frombuffer(elem.value, f"{order}u{widths[elem.VR]}").tolist()
        else:
            values[elem.tag] = elem.value
    return values


# --- the API ---------------------------------------------------------------------------------

def test_transfer_syntax_sets() -> None:
    assert LOSSLESS_TRANSFER_SYNTAXES == {
        "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
    }
    assert UNCOMPRESSED_TRANSFER_SYNTAXES == {
        "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.1.99",
    }
    assert {str(uid) for uid in TARGET.values()} <= LOSSLESS_TRANSFER_SYNTAXES
    assert [c.value for c in Codec] == ["jpeg-ls", "jpeg-2000", "htj2k"]


@pytest.mark.parametrize("codec", CODECS)
def test_verifier_is_a_different_library_and_is_installed(codec: Codec) -> None:
    """Verification decodes with libjpeg (JPEG-LS) or OpenJPEG (JPEG 2000, HTJ2K), never
    with the encoders of JPEG-LS and HTJ2K (CharLS via pyjpegls, OpenJPH via imagecodecs)."""
    verifier = transcode._VERIFIERS[codec]
    assert verifier.__module__ == {Codec.JPEG_LS: "libjpeg.utils"}.get(codec, "openjpeg.utils")
    encoder_libraries = {Codec.JPEG_LS: "jpeg_ls", Codec.HTJ2K: "imagecodecs"}
    if codec in encoder_libraries:
        assert not verifier.__module__.startswith(encoder_libraries[codec])
    assert "pylibjpeg" in get_decoder(TARGET[codec]).available_plugins


def test_codec_given_as_its_string_value() -> None:
    dataset = _sample_ct()
    outcome = transcode_lossless(dataset, "htj2k")  # type: ignore[arg-type]
    assert outcome.status is TranscodeStatus.COMPRESSED
    assert dataset.file_meta.TransferSyntaxUID == HTJ2KLossless
    unknown = _sample_ct()
    before = _encode(unknown)
    outcome = transcode_lossless(unknown, "jpeg-xl")  # type: ignore[arg-type]
    assert outcome.status is TranscodeStatus.NOT_APPLICABLE and "unknown codec" in outcome.reason
    assert _encode(unknown) == before


# --- exact round trips -----------------------------------------------------------------------

@pytest.mark.parametrize("codec", CODECS)
def test_sample_ct_12_bit_round_trip(codec: Codec) -> None:
    dataset = _sample_ct()
    assert (dataset.Rows, dataset.Columns, dataset.BitsAllocated, dataset.BitsStored,
            dataset.PixelRepresentation) == (512, 512, 16, 12, 0)
    expected = dataset.pixel_array.copy()
    raw = len(dataset.PixelData)
    assert "LossyImageCompression" not in dataset

    outcome = transcode_lossless(dataset, codec)

    assert outcome.status is TranscodeStatus.COMPRESSED, outcome.reason
    assert (outcome.source_transfer_syntax_uid, outcome.stored_transfer_syntax_uid) == (
        ExplicitVRLittleEndian, TARGET[codec])
    assert outcome.original_bytes == raw == 512 * 512 * 2
    assert outcome.stored_bytes == len(dataset.PixelData) < raw / 2  # > 2:1 on this CT
    assert outcome.encode_seconds > 0 and outcome.verify_seconds > 0
    assert "LossyImageCompression" not in dataset  # lossless: nothing to declare
    again = _check_round_trip(codec, dataset, expected)
    frames = _frames(again)
    assert len(frames) == 1
    precision, signed = _codestream_info(codec, frames[0])
    # imagecodecs' HTJ2K encoder has no bit-depth option: it writes the 16-bit container
    assert precision == (16 if codec is Codec.HTJ2K else 12)
    assert signed in (None, False)


@pytest.mark.parametrize("bits_stored", [16, 12])
@pytest.mark.parametrize("codec", CODECS)
def test_signed_16_bit_with_negative_values(codec: Codec, bits_stored: int) -> None:
    arr = _signed(bits_stored)
    assert arr.min() == -(1 << (bits_stored - 1)) and (arr < 0).sum() > 1000
    dataset = _dataset(arr, "MONOCHROME2", bits_stored)
    assert dataset.PixelRepresentation == 1

    again = _assert_exact(codec, dataset, arr)

    assert again.PixelRepresentation == 1 and again.BitsStored == bits_stored
    precision, signed = _codestream_info(codec, _frames(again)[0])
    if codec is Codec.JPEG_LS:  # two's complement bit pattern in Bits Stored bits
        assert precision == bits_stored
    elif codec is Codec.JPEG_2000:  # a signed component, as PS3.5 8.2.4 requires
        assert (precision, signed) == (bits_stored, True)
    else:
        assert (precision, signed) == (16, True)


@pytest.mark.parametrize("codec", CODECS)
def test_8_bit_monochrome2(codec: Codec) -> None:
    arr = _smooth((300, 310), 0, 255, seed=8, noise=2.0).astype(np.uint8)
    dataset = _dataset(arr, "MONOCHROME2", 8)
    again = _assert_exact(codec, dataset, arr)
    signed = None if codec is Codec.JPEG_LS else False
    assert _codestream_info(codec, _frames(again)[0]) == (8, signed)
    assert len(again.PixelData) < arr.nbytes


@pytest.mark.parametrize("codec", CODECS)
def test_16_bit_allocated_8_bit_stored(codec: Codec) -> None:
    """pydicom decodes precision-8 codestreams as an 8-bit array: values still identical."""
    arr = _smooth((64, 80), 0, 255, seed=2, noise=1.0).astype(np.uint16)
    dataset = _dataset(arr, "MONOCHROME2", 8)
    assert dataset.BitsAllocated == 16
    _assert_exact(codec, dataset, arr)


@pytest.mark.parametrize("planar", [0, 1])
@pytest.mark.parametrize("codec", CODECS)
def test_rgb_8_bit_both_planar_configurations(codec: Codec, planar: int) -> None:
    arr = _rgb()
    dataset = _dataset(arr, "RGB", 8, planar=planar)
    assert dataset.PlanarConfiguration == planar

    again = _assert_exact(codec, dataset, arr)

    assert again.PlanarConfiguration == 0 and again.PhotometricInterpretation == "RGB"
    assert again.SamplesPerPixel == 3
    assert len(again.PixelData) < arr.nbytes


@pytest.mark.parametrize("planar", [0, 1])
@pytest.mark.parametrize("codec", CODECS)
def test_multi_frame(codec: Codec, planar: int) -> None:
    for arr, photometric, bits in ((_signed(12, frames=3), "MONOCHROME2", 12),
                                   (_rgb(frames=3), "RGB", 8)):
        if planar and photometric != "RGB":
            continue
        dataset = _dataset(arr, photometric, bits, planar=planar)
        assert dataset.NumberOfFrames == 3
        again = _assert_exact(codec, dataset, arr)
        frames = _frames(again)
        assert len(frames) == 3
        offsets = parse_basic_offsets(again.PixelData)  # Basic Offset Table present
        assert offsets == [0, len(frames[0]) + 8, len(frames[0]) + len(frames[1]) + 16]
        for index in range(3):  # every frame decodes on its own
            frame = pixel_array(again, index=index)
            assert np.array_equal(frame, arr[index])


REAL_FILES = ["CT_small.dcm", "MR_small.dcm", "SC_rgb.dcm", "SC_rgb_16bit.dcm",
              "MR_small_bigendian.dcm", "emri_small.dcm", "emri_small_big_endian.dcm",
              "SC_rgb_expb_16bit.dcm", "ExplVR_BigEnd.dcm", "OBXXXX1A.dcm", "OBXXXX1A_expb.dcm",
              "image_dfl.dcm", "SC_rgb_2frame.dcm", "color-pl.dcm", "US1_UNCR.dcm"]


@pytest.mark.parametrize("name", REAL_FILES)
@pytest.mark.parametrize("codec", CODECS)
def test_real_files_round_trip(codec: Codec, name: str) -> None:
    original = pydicom.dcmread(_testdata(name))
    source_syntax = original.file_meta.TransferSyntaxUID
    assert source_syntax in UNCOMPRESSED_TRANSFER_SYNTAXES
    expected = _native(original.pixel_array)
    dataset = pydicom.dcmread(_testdata(name))

    outcome = transcode_lossless(dataset, codec)

    assert outcome.status is TranscodeStatus.COMPRESSED, outcome.reason
    assert outcome.source_transfer_syntax_uid == source_syntax
    again = _round_trip(dataset)
    assert again.file_meta.TransferSyntaxUID == TARGET[codec]
    assert again.original_encoding == (False, True)  # explicit VR little endian, always
    decoded = again.pixel_array
    assert decoded.dtype.kind == expected.dtype.kind and np.array_equal(decoded, expected)
    # every other element survives, by value (big endian OW data byte-swapped, not garbled)
    assert _comparable(again) == _comparable(original)
    if original.PhotometricInterpretation == "PALETTE COLOR":
        # the colours are those of the little endian twin file (pydicom's apply_color_lut reads
        # LUT data as native-endian, so it cannot serve as the reference on the big endian one)
        twin = pydicom.dcmread(_testdata("OBXXXX1A.dcm"))
        colours = apply_color_lut(twin.pixel_array, twin)
        assert np.array_equal(apply_color_lut(decoded, again), colours)


@pytest.mark.parametrize("codec", CODECS)
def test_compression_ratio_on_realistic_images(codec: Codec) -> None:
    ratios = {}
    for name, dataset in [("sample CT", _sample_ct())] + [
            (n, pydicom.dcmread(_testdata(n)))
            for n in ("CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "US1_UNCR.dcm",
                      "OBXXXX1A.dcm", "SC_rgb.dcm")]:
        outcome = transcode_lossless(dataset, codec)
        assert outcome.status is TranscodeStatus.COMPRESSED, (name, outcome.reason)
        assert outcome.stored_bytes < outcome.original_bytes, name
        ratios[name] = outcome.original_bytes / outcome.stored_bytes
    assert ratios["sample CT"] > 2.0
    print(codec.value, {k: round(v, 2) for k, v in ratios.items()})


@pytest.mark.parametrize("codec", CODECS)
def test_tiny_odd_sized_image_is_exact_or_refused_untouched(codec: Codec) -> None:
    """3x3 RGB: pyjpegls' output buffer estimate is too small for it (an encoder error)."""
    dataset = pydicom.dcmread(_testdata("SC_rgb_small_odd.dcm"))
    expected = dataset.pixel_array.copy()
    before = _encode(dataset)
    outcome = transcode_lossless(dataset, codec)
    if outcome.status is TranscodeStatus.COMPRESSED:
        assert np.array_equal(_round_trip(dataset).pixel_array, expected)
    else:
        assert outcome.status is TranscodeStatus.VERIFICATION_FAILED and outcome.reason
        assert _encode(dataset) == before


def test_implicit_vr_source() -> None:
    dataset = _sample_ct()
    dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit = pydicom.dcmread(BytesIO(_encode(dataset)))
    assert implicit.original_encoding == (True, True)
    expected = implicit.pixel_array.copy()
    again = _assert_exact(Codec.JPEG_LS, implicit, expected)
    assert again["WindowCenter"].VR == "DS" and again.RescaleIntercept == -1024


# --- left alone ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR2_J2KI.dcm"])
@pytest.mark.parametrize("codec", CODECS)
def test_already_compressed_is_untouched(codec: Codec, name: str) -> None:
    dataset = pydicom.dcmread(_testdata(name))
    syntax = dataset.file_meta.TransferSyntaxUID
    before = _encode(dataset)
    pixel_element = dataset["PixelData"]

    outcome = transcode_lossless(dataset, codec)

    assert outcome.status is TranscodeStatus.ALREADY_COMPRESSED
    assert outcome.source_transfer_syntax_uid == outcome.stored_transfer_syntax_uid == syntax
    assert outcome.original_bytes == outcome.stored_bytes == len(dataset.PixelData)
    assert dataset.file_meta.TransferSyntaxUID == syntax
    assert dataset["PixelData"] is pixel_element
    assert _encode(dataset) == before


def _no_pixel_data() -> Dataset:
    dataset = _sample_ct()
    del dataset.PixelData
    return dataset


def _float_pixel_data() -> Dataset:
    dataset = _no_pixel_data()
    dataset.FloatPixelData = np.zeros((512, 512), np.float32).tobytes()
    return dataset


def _from_file(name: str) -> Callable[[], Dataset]:
    return lambda: pydicom.dcmread(_testdata(name))


def _bits_stored_above_allocated() -> Dataset:
    dataset = _dataset(np.zeros((8, 8), np.uint8), "MONOCHROME2", 8)
    dataset.BitsStored, dataset.HighBit = 12, 11
    return dataset


def _embedded_overlay() -> Dataset:
    dataset = _sample_ct()
    dataset.add_new(0x60000010, "US", 512)
    dataset.add_new(0x60000011, "US", 512)
    dataset.add_new(0x60000100, "US", 16)  # Overlay Bits Allocated 16: in the pixel data
    dataset.add_new(0x60000102, "US", 15)
    return dataset


def _big_endian_with_un() -> Dataset:
    dataset = pydicom.dcmread(_testdata("MR_small_bigendian.dcm"))
    dataset.add_new(0x00091010, "UN", b"\x00\x01\x02\x03")
    return dataset


def _ybr_full() -> Dataset:
    return pydicom.dcmread(_testdata("SC_ybr_full_uncompressed.dcm"))


@pytest.mark.parametrize("make, reason", [
    (_no_pixel_data, "no pixel data"),
    (_float_pixel_data, "float"),
    (_from_file("rtdose.dcm"), "Bits Allocated 32"),
    (_from_file("liver.dcm"), "Bits Allocated 1"),
    (_ybr_full, "Photometric Interpretation YBR_FULL"),
    (_bits_stored_above_allocated, "Bits Stored 12"),
    (_embedded_overlay, "overlay"),
    (_big_endian_with_un, "UN element"),
], ids=["no-pixels", "float", "32-bit", "1-bit", "ybr-full", "bits-stored", "overlay",
        "big-endian-UN"])
@pytest.mark.parametrize("codec", CODECS)
def test_not_applicable_is_untouched(codec: Codec, make: Callable[[], Dataset],
                                     reason: str) -> None:
    dataset = make()
    before = _encode(dataset)
    syntax = dataset.file_meta.TransferSyntaxUID

    outcome = transcode_lossless(dataset, codec)

    assert outcome.status is TranscodeStatus.NOT_APPLICABLE
    assert reason in outcome.reason
    assert outcome.stored_transfer_syntax_uid == syntax == dataset.file_meta.TransferSyntaxUID
    assert _encode(dataset) == before


@pytest.mark.parametrize("delta", [-2, +2, -512 * 512])
@pytest.mark.parametrize("codec", CODECS)
def test_pixel_data_length_mismatch_fails_untouched(codec: Codec, delta: int) -> None:
    """Short Pixel Data cannot be decoded; extra bytes would be silently dropped: refused."""
    dataset = _sample_ct()
    data = dataset.PixelData
    dataset.PixelData = data[:delta] if delta < 0 else data + b"\x00" * delta
    before = _encode(dataset)

    outcome = transcode_lossless(dataset, codec)

    assert outcome.status is TranscodeStatus.VERIFICATION_FAILED
    assert "Pixel Data is" in outcome.reason
    assert dataset.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert _encode(dataset) == before


@pytest.mark.parametrize("name", ["CT_small.dcm", "OBXXXX1A_expb.dcm", "SC_rgb_expb_16bit.dcm"])
@pytest.mark.parametrize("codec", CODECS)
def test_mismatch_after_encoding_restores_exactly(codec: Codec, name: str) -> None:
    """The commit step transcode_lossless uses: Pixel Data whose frames, read back, are not
    the verified codestreams (one byte changed) is rejected and everything is put back,
    including a big endian source's byte-swapped palette and its encoding."""
    dataset = pydicom.dcmread(_testdata(name))
    before = _encode(dataset)
    module = transcode._check_pixel_module(dataset)
    big_endian = dataset.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    swaps = transcode._plan_byte_swaps(dataset) if big_endian else None
    frames = _native(pixel_array(dataset)).reshape(
        (module.number_of_frames, *module.frame_shape))
    encoded = [transcode._ENCODERS[codec](frame, module) for frame in frames]
    elements = transcode._encapsulated_elements(encoded)
    verified = list(encoded)
    middle = len(verified[0]) // 2
    verified[0] = verified[0][:middle] + bytes([verified[0][middle] ^ 1]) + verified[0][middle + 1:]

    reason = transcode._commit_if_verified(
        dataset, TARGET[codec], elements, module, swaps, verified)

    assert reason == "frame 0: the stored codestream is not the verified one"
    assert dataset.file_meta.TransferSyntaxUID == (ExplicitVRBigEndian if big_endian
                                                   else ExplicitVRLittleEndian)
    assert _encode(dataset) == before
    # and the same commit with the true codestreams keeps it
    assert transcode._commit_if_verified(
        dataset, TARGET[codec], elements, module, swaps, encoded) is None
    assert dataset.file_meta.TransferSyntaxUID == TARGET[codec]


@pytest.mark.parametrize("name", ["CT_small.dcm", "SC_rgb_expb_16bit.dcm"])
@pytest.mark.parametrize("codec", CODECS)
def test_a_corrupted_encoder_output_is_caught(codec: Codec, name: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An encoder whose output is wrong (one bit of its entropy-coded data flipped, as a
    codec bug or a memory error would do) is caught by the independent decode: nothing
    changes, the reason names the frame."""
    encoder = transcode._ENCODERS[codec]

    def corrupting(frame: np.ndarray, module: transcode._PixelModule) -> bytes:
        codestream = bytearray(encoder(frame, module))
        position = len(codestream) * 2 // 3
        codestream[position] ^= 0x10 if codestream[position] != 0xEF else 0x01  # never 0xFF
        return bytes(codestream)

    monkeypatch.setitem(transcode._ENCODERS, codec, corrupting)
    dataset = pydicom.dcmread(_testdata(name))
    before = _encode(dataset)

    outcome = transcode_lossless(dataset, codec)

    assert outcome.status is TranscodeStatus.VERIFICATION_FAILED
    assert outcome.reason.startswith("frame 0: ")
    assert _encode(dataset) == before


# --- independent readers: dcmdump and dcmtk's JPEG-LS decoder ----------------------------------

def _dcmtk_cases() -> dict[str, Callable[[], tuple[Dataset, np.ndarray]]]:
    def ct() -> tuple[Dataset, np.ndarray]:
        dataset = _sample_ct()
        return dataset, dataset.pixel_array.copy()

    def signed12() -> tuple[Dataset, np.ndarray]:
        arr = _signed(12, frames=3)
        return _dataset(arr, "MONOCHROME2", 12), arr

    def signed16() -> tuple[Dataset, np.ndarray]:
        arr = _signed(16)
        return _dataset(arr, "MONOCHROME2", 16), arr

    def rgb_planar() -> tuple[Dataset, np.ndarray]:
        arr = _rgb(frames=2)
        return _dataset(arr, "RGB", 8, planar=1), arr

    def big_endian_palette() -> tuple[Dataset, np.ndarray]:
        dataset = pydicom.dcmread(_testdata("OBXXXX1A_expb.dcm"))
        return dataset, _native(dataset.pixel_array)

    return {"ct-12bit": ct, "signed-12bit-3frames": signed12, "signed-16bit": signed16,
            "rgb-planar1-2frames": rgb_planar, "big-endian-palette": big_endian_palette}


DCMTK_CASES = _dcmtk_cases()


@pytest.mark.parametrize("case", list(DCMTK_CASES))
@pytest.mark.parametrize("codec", CODECS)
def test_dcmdump_reads_the_compressed_file(codec: Codec, case: str, tmp_path: Path) -> None:
    dataset, _ = DCMTK_CASES[case]()
    _transcoded(dataset, codec)
    path = tmp_path / "out.dcm"
    path.write_bytes(_encode(dataset))
    assert _dcmdump_errors(path) == []


@pytest.mark.parametrize("case", list(DCMTK_CASES))
def test_dcmdjpls_decodes_to_the_original_pixels(case: str, tmp_path: Path) -> None:
    """A third JPEG-LS decoder (dcmtk's CharLS fork), through a file on disk."""
    tool = shutil.which("dcmdjpls")
    if tool is None:
        pytest.fail("dcmtk's dcmdjpls is not installed: run `make test` (it installs dcmtk)")
    dataset, expected = DCMTK_CASES[case]()
    _transcoded(dataset, Codec.JPEG_LS)
    compressed, decompressed = tmp_path / "jls.dcm", tmp_path / "raw.dcm"
    compressed.write_bytes(_encode(dataset))

    result = subprocess.run([tool, str(compressed), str(decompressed)],
                            check=False, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith("E:")]
    raw = pydicom.dcmread(decompressed)
    assert raw.file_meta.TransferSyntaxUID in UNCOMPRESSED_TRANSFER_SYNTAXES
    decoded = raw.pixel_array
    assert decoded.dtype.kind == expected.dtype.kind
    assert np.array_equal(decoded, expected)
