"""Derived objects on real data: PNG thumbnails (pydicom test files, the synthetic study) and
the XDS-I.b KOS manifest (highdicom), checked with pydicom and dcmtk's dsrdump."""

from __future__ import annotations

import copy
import io
import random
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import BasicTextSRStorage, KeyObjectSelectionDocumentStorage

from gateway.sample_study import SampleStudySpec, build_sample_study, write_sample_study
from imaging import RenderError, render_thumbnail
from worker.derived import (
    FALLBACK_CONTENT_DATETIME,
    DerivedObjectError,
    build_kos_manifest,
    choose_series_thumbnail_instance,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SPEC = SampleStudySpec(ct_slices=5, mr_slices=3)
MANIFEST_SERIES_UID = "1.2.826.0.1.3680043.8.498.999.1"
MANIFEST_SOP_UID = "1.2.826.0.1.3680043.8.498.999.1.1"
PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
    "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID",
)


def _testfile(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is missing"
    return Path(path)


def _read(name: str) -> Dataset:
    return pydicom.dcmread(_testfile(name))


def _image(png: bytes) -> Image.Image:
    assert png.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def _assert_fitted(image: Image.Image, rows: int, columns: int, size: int = 128) -> None:
    width, height = image.size
    assert width <= size and height <= size
    assert max(width, height) == min(size, max(rows, columns))  # shrunk to fit, never grown
    assert abs(width / height - columns / rows) <= 1.0 / min(width, height)


@pytest.fixture(scope="module")
def study() -> list[Dataset]:
    return build_sample_study(SPEC)


def _manifest(datasets: Sequence[Dataset], **kwargs: str) -> Dataset:
    return build_kos_manifest(
        datasets,
        manifest_series_instance_uid=MANIFEST_SERIES_UID,
        manifest_sop_instance_uid=MANIFEST_SOP_UID,
        **kwargs,
    )


def _encode(dataset: Dataset) -> bytes:
    out = io.BytesIO()
    pydicom.dcmwrite(out, dataset, enforce_file_format=True)
    return out.getvalue()


def _walk(dataset: Dataset) -> Iterator[pydicom.DataElement]:
    for element in dataset:
        yield element
        if element.VR == "SQ":
            for item in element.value:
                yield from _walk(item)


# --------------------------------------------------------------------------- thumbnails


def test_ct_small_thumbnail_is_greyscale_png_with_contrast() -> None:
    ds = _read("CT_small.dcm")
    image = _image(render_thumbnail(ds))
    assert image.mode == "L"
    _assert_fitted(image, ds.Rows, ds.Columns)
    pixels = np.asarray(image)
    assert pixels.std() > 20 and pixels.min() < 30 and pixels.max() > 225


def test_synthetic_ct_is_windowed_with_its_first_window(study: list[Dataset]) -> None:
    ct = choose_series_thumbnail_instance([ds for ds in study if ds.Modality == "CT"])
    image = _image(render_thumbnail(ct))
    assert image.mode == "L" and image.size == (128, 128)
    pixels = np.asarray(image, dtype=float)
    assert pixels.std() > 40  # not uniform: air, soft tissue, lungs and bone all visible
    assert pixels[2:6, 2:6].mean() < 3  # air (-1000 HU) is below the 40/400 window: black
    # Soft tissue (40 HU) sits at the window centre: mid grey (min-max would give ~150).
    assert abs(pixels[62:66, 10:16].mean() - 127.5) < 10
    assert pixels[90:94, 62:66].mean() > 250  # bone (700 HU) is above the window: white


def test_thumbnail_does_not_modify_the_dataset(study: list[Dataset]) -> None:
    ct = copy.deepcopy(study[0])
    before = _encode(ct)
    render_thumbnail(ct)
    assert _encode(ct) == before


def test_rgb_thumbnail_is_colour_and_not_enlarged() -> None:
    ds = _read("SC_rgb.dcm")
    image = _image(render_thumbnail(ds))
    assert image.mode == "RGB"
    assert image.size == (ds.Columns, ds.Rows) == (100, 100)
    pixels = np.asarray(image)
    assert (pixels[..., 0] != pixels[..., 1]).any()  # real colours, not grey


def test_ybr_jpeg_thumbnail_is_converted_to_rgb() -> None:
    reference = np.asarray(_image(render_thumbnail(_read("SC_rgb.dcm"))), dtype=float)
    image = _image(render_thumbnail(_read("SC_rgb_jpeg_dcmtk.dcm")))
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image, dtype=float) - reference).mean() < 5  # lossy, same colours


def test_compressed_greyscale_thumbnails_equal_the_uncompressed_ones() -> None:
    lossless = render_thumbnail(_read("MR_small_jpeg_ls_lossless.dcm"))
    image = _image(lossless)
    assert image.mode == "L" and image.size == (64, 64)
    assert np.asarray(image).std() > 20
    assert lossless == render_thumbnail(_read("MR_small.dcm"))
    assert render_thumbnail(_read("RG1_J2KR.dcm")) == render_thumbnail(_read("RG1_UNCR.dcm"))


def test_monochrome1_is_inverted() -> None:
    ds = _read("RG1_UNCR.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    mono1 = _image(render_thumbnail(ds))
    assert mono1.mode == "L"
    _assert_fitted(mono1, ds.Rows, ds.Columns)
    as_mono2 = copy.deepcopy(ds)
    as_mono2.PhotometricInterpretation = "MONOCHROME2"
    mono2 = _image(render_thumbnail(as_mono2))
    a, b = np.asarray(mono1, dtype=float), np.asarray(mono2, dtype=float)
    assert abs(a.mean() - b.mean()) > 50
    assert abs(a.mean() + b.mean() - 255) < 1.5
    assert np.abs(a + b - 255).max() <= 2  # pixel by pixel, up to rounding


def test_palette_color_goes_through_the_palette() -> None:
    ds = _read("OBXXXX1A.dcm")
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    image = _image(render_thumbnail(ds))
    assert image.mode == "RGB"
    _assert_fitted(image, ds.Rows, ds.Columns)
    assert image.size == (128, 96)
    pixels = np.asarray(image)
    assert (pixels[..., 0] != pixels[..., 2]).mean() > 0.05  # coloured by the palette
    # 16-bit palette entries, implicit VR
    sixteen = _read("gdcm-US-ALOKA-16.dcm")
    image16 = np.asarray(_image(render_thumbnail(sixteen)))
    assert image16.shape == (96, 128, 3) and image16.std() > 10


def test_multiframe_uses_the_middle_frame() -> None:
    # The second frame of these pydicom files is the inverse of OBXXXX1A.dcm's only frame.
    first = render_thumbnail(_read("OBXXXX1A.dcm"))
    middle = render_thumbnail(_read("OBXXXX1A_2frame.dcm"))
    assert middle != first
    assert render_thumbnail(_read("OBXXXX1A_rle_2frame.dcm")) == middle
    one = _read("OBXXXX1A_2frame.dcm")
    one.NumberOfFrames = 1  # now the middle (only) frame is the first one
    with pytest.warns(UserWarning, match="Number of Frames"):
        assert render_thumbnail(one) == first


def test_enhanced_ct_uses_the_functional_group_window_and_rescale() -> None:
    ds = _read("eCT_Supplemental.dcm")
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert "WindowCenter" not in ds and "RescaleSlope" not in ds
    enhanced = render_thumbnail(ds)
    image = _image(enhanced)
    assert image.mode == "L" and image.size == (128, 128)
    # The same pixels with the macros' values as top-level attributes render identically...
    classic = copy.deepcopy(ds)
    for macro in ("FrameVOILUTSequence", "PixelValueTransformationSequence"):
        for element in shared[macro][0]:
            classic.add(copy.deepcopy(element))
    del classic.SharedFunctionalGroupsSequence
    assert render_thumbnail(classic) == enhanced
    # ... and differently from the same image without its window (min-max).
    del classic.WindowCenter, classic.WindowWidth
    unwindowed = np.asarray(_image(render_thumbnail(classic)), dtype=float)
    assert np.abs(unwindowed - np.asarray(image, dtype=float)).mean() > 20


def test_size_argument() -> None:
    ds = _read("JPEG2000.dcm")
    image = _image(render_thumbnail(ds, size=64))
    _assert_fitted(image, ds.Rows, ds.Columns, size=64)
    assert image.size == (16, 64)
    with pytest.raises(ValueError):
        render_thumbnail(ds, size=0)


def test_no_pixel_data_raises() -> None:
    ds = pydicom.dcmread(_testfile("CT_small.dcm"), stop_before_pixels=True)
    with pytest.raises(RenderError, match="no pixel data"):
        render_thumbnail(ds)


def test_choose_series_thumbnail_instance(study: list[Dataset], tmp_path: Path) -> None:
    ct = [ds for ds in study if ds.Modality == "CT"]
    shuffled = list(ct)
    random.Random(4).shuffle(shuffled)
    header_only = copy.deepcopy(ct[0])
    del header_only.PixelData
    header_only.InstanceNumber = 3
    assert choose_series_thumbnail_instance([header_only, *shuffled]) is ct[2]

    no_numbers = [copy.deepcopy(ds) for ds in ct]
    for ds in no_numbers:
        del ds.InstanceNumber
    by_uid = sorted(no_numbers, key=lambda ds: [int(p) for p in ds.SOPInstanceUID.split(".")])
    assert choose_series_thumbnail_instance(no_numbers[::-1]) is by_uid[2]

    with pytest.raises(DerivedObjectError):
        choose_series_thumbnail_instance([header_only])
    with pytest.raises(DerivedObjectError):
        choose_series_thumbnail_instance([])


def test_choose_from_dicom_json_headers(study: list[Dataset]) -> None:
    """The stored per-instance DICOM JSON (pixel data as a BulkDataURI) is enough to choose."""
    ct = [ds for ds in study if ds.Modality == "CT"]
    headers = [
        Dataset.from_json(
            ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda _: "bulk"),
            bulk_data_uri_handler=lambda _tag, _vr, _uri: None,
        )
        for ds in reversed(ct)
    ]
    chosen = choose_series_thumbnail_instance(headers)
    assert chosen.SOPInstanceUID == ct[2].SOPInstanceUID
    with pytest.raises(RenderError, match="no pixel data"):
        render_thumbnail(chosen)


# --------------------------------------------------------------------------- manifest


def test_manifest_round_trip_and_content(study: list[Dataset]) -> None:
    manifest = _manifest(
        study, retrieve_ae_title="DGW", retrieve_url="https://gateway.example/dicomweb"
    )
    read = pydicom.dcmread(io.BytesIO(_encode(manifest)))
    assert read.SOPClassUID == KeyObjectSelectionDocumentStorage
    assert read.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"
    assert read.file_meta.MediaStorageSOPClassUID == KeyObjectSelectionDocumentStorage
    assert read.SOPInstanceUID == MANIFEST_SOP_UID
    assert read.SeriesInstanceUID == MANIFEST_SERIES_UID
    assert read.SeriesNumber == 9999 and read.InstanceNumber == 1
    assert read.Modality == "KO" and read.Manufacturer == "dicom-gateway"
    title = read.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113030", "DCM", "Manifest",
    )
    assert read.ContentTemplateSequence[0].TemplateIdentifier == "2010"

    for keyword in PATIENT_STUDY_KEYWORDS:
        assert str(read[keyword].value) == str(study[0][keyword].value), keyword

    expected: dict[str, set[tuple[str, str]]] = {}
    for ds in study:
        expected.setdefault(ds.SeriesInstanceUID, set()).add((ds.SOPClassUID, ds.SOPInstanceUID))
    (study_item,) = read.CurrentRequestedProcedureEvidenceSequence
    assert study_item.StudyInstanceUID == study[0].StudyInstanceUID
    found: dict[str, set[tuple[str, str]]] = {}
    for series_item in study_item.ReferencedSeriesSequence:
        assert series_item.RetrieveAETitle == "DGW"
        assert series_item.RetrieveURL == "https://gateway.example/dicomweb"
        refs = {
            (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID)
            for ref in series_item.ReferencedSOPSequence
        }
        assert len(refs) == len(series_item.ReferencedSOPSequence)
        found[series_item.SeriesInstanceUID] = refs
    assert found == expected

    items = read.ContentSequence
    assert [item.ValueType for item in items] == ["IMAGE"] * len(study)
    assert {
        (item.ReferencedSOPSequence[0].ReferencedSOPClassUID,
         item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in items
    } == {(ds.SOPClassUID, ds.SOPInstanceUID) for ds in study}


def test_manifest_without_retrieve_information(study: list[Dataset]) -> None:
    read = pydicom.dcmread(io.BytesIO(_encode(_manifest(study))))
    for series_item in read.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence:
        assert "RetrieveAETitle" not in series_item and "RetrieveURL" not in series_item


def test_manifest_is_deterministic(study: list[Dataset], tmp_path: Path) -> None:
    kwargs = {"retrieve_ae_title": "DGW", "retrieve_url": "https://gateway.example/dicomweb"}
    first = _encode(_manifest(study, **kwargs))
    assert _encode(_manifest(study, **kwargs)) == first
    shuffled = list(study)
    random.Random(7).shuffle(shuffled)
    assert _encode(_manifest(shuffled, **kwargs)) == first
    # Headers read without pixel data are enough, and give the same document.
    paths = write_sample_study(tmp_path / "study", SPEC)
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
    assert all("PixelData" not in ds for ds in headers)
    assert _encode(_manifest(headers, **kwargs)) == first
    # The stored previous manifest, passed back with the study, is not referenced.
    previous = pydicom.dcmread(io.BytesIO(first))
    assert _encode(_manifest([*study, previous], **kwargs)) == first


def test_manifest_dates_come_from_the_shifted_evidence(study: list[Dataset]) -> None:
    shifted = [copy.deepcopy(ds) for ds in study]
    for ds in shifted:
        ds.StudyDate, ds.StudyTime = "20010203", "081500"
        ds.ContentDate, ds.ContentTime = "20010203", "0930"
    shifted[3].ContentTime = "101500.5"
    read = pydicom.dcmread(io.BytesIO(_encode(_manifest(shifted))))
    assert (read.ContentDate, read.ContentTime) == ("20010203", "101500.500000")
    assert (read.InstanceCreationDate, read.InstanceCreationTime) == ("20010203", "101500.500000")
    assert (read.StudyDate, read.StudyTime) == ("20010203", "081500")
    dates = [str(el.value) for el in _walk(read) if el.VR in ("DA", "DT") and el.value]
    assert dates and all(
        value.startswith("20010203") or value == study[0].PatientBirthDate for value in dates
    ), dates

    undated = [copy.deepcopy(ds) for ds in study]
    for ds in undated:
        for keyword in ("StudyDate", "StudyTime", "ContentDate", "ContentTime"):
            delattr(ds, keyword)
    read = pydicom.dcmread(io.BytesIO(_encode(_manifest(undated))))
    assert read.ContentDate == FALLBACK_CONTENT_DATETIME.strftime("%Y%m%d")
    assert read.ContentTime == "000000"
    assert read.StudyDate in (None, "")


def test_manifest_references_every_sop_class(study: list[Dataset]) -> None:
    report = Dataset()
    for keyword in ("SpecificCharacterSet", "StudyInstanceUID", *PATIENT_STUDY_KEYWORDS):
        setattr(report, keyword, study[0][keyword].value)
    report.SOPClassUID = BasicTextSRStorage
    report.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.777.1.1"
    report.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.777.1"
    report.SeriesNumber = 50
    report.InstanceNumber = 1
    read = pydicom.dcmread(io.BytesIO(_encode(_manifest([*study, report]))))
    series = read.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert len(series) == 3
    last = series[-1]
    assert last.SeriesInstanceUID == report.SeriesInstanceUID
    assert [
        (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID)
        for ref in last.ReferencedSOPSequence
    ] == [(BasicTextSRStorage, report.SOPInstanceUID)]
    value_types = [item.ValueType for item in read.ContentSequence]
    assert value_types == ["IMAGE"] * len(study) + ["COMPOSITE"]


def test_manifest_refuses_mixed_studies_and_empty_input(study: list[Dataset]) -> None:
    other = build_sample_study(SampleStudySpec(ct_slices=1, mr_slices=1, seed=2))
    assert other[0].StudyInstanceUID != study[0].StudyInstanceUID
    with pytest.raises(DerivedObjectError, match="2 studies"):
        _manifest([*study, other[0]])
    with pytest.raises(DerivedObjectError, match="empty"):
        _manifest([])
    nameless = copy.deepcopy(study[0])
    del nameless.StudyInstanceUID
    with pytest.raises(DerivedObjectError, match="StudyInstanceUID"):
        _manifest([study[1], nameless])


def test_dsrdump_renders_the_manifest(study: list[Dataset], tmp_path: Path) -> None:
    dsrdump = shutil.which("dsrdump") or "/usr/bin/dsrdump"
    assert Path(dsrdump).exists(), "dcmtk's dsrdump is required"
    path = tmp_path / "manifest.dcm"
    manifest = _manifest(study, retrieve_ae_title="DGW", retrieve_url="https://gw.example/wado")
    pydicom.dcmwrite(path, manifest, enforce_file_format=True)
    result = subprocess.run(
        [dsrdump, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert not [line for line in output.splitlines() if line.startswith("E:")], output
    assert "Key Object Selection Document" in output
    assert '(,,"Manifest")' in output
    assert output.count('IMAGE:(,,"Source")') == len(study)
