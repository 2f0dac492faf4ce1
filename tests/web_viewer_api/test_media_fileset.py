"""The share ZIP's DICOMDIR (web_viewer_api.media): read back by pydicom's File-set reader,
which follows the records' offsets, on real files of several patients, studies, series and
record types, with Type 1 values de-identification emptied."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.fileset import FileSet
from pydicom.uid import generate_uid

from web_viewer_api.media import MediaFileSet


def _body(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_the_dicomdir_indexes_every_file_under_its_patient_study_and_series(tmp_path: Path) -> None:
    bodies = [Path(get_testdata_file(name)).read_bytes()  # type: ignore[arg-type]
              for name in ("CT_small.dcm", "MR_small.dcm", "rtdose.dcm", "SC_rgb.dcm")]
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series = generate_uid()
    for number in range(1, 4):  # a second CT series of the same study, emptied like a de-identified one
        copy = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        copy.SeriesInstanceUID, copy.SeriesNumber, copy.StudyID = series, None, ""
        copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copy.InstanceNumber = None
        bodies.append(_body(copy))
    report = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # an SR lacking its flags
    del report.PixelData
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    report.SOPInstanceUID = report.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    bodies.append(_body(report))
    media = MediaFileSet()
    names = [media.add(body) for body in bodies]
    assert media.add(bodies[0]) is None and media.add(b"not dicom") is None  # once each
    assert all(name is not None for name in names) and len(set(names)) == len(names)
    for name, body in zip(names, bodies, strict=True):
        assert name is not None
        assert all(1 <= len(part) <= 8 and part.isalnum() and part.isupper() or part.isdigit()
                   for part in name.split("/"))
        target = tmp_path.joinpath(*name.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
    (tmp_path / "DICOMDIR").write_bytes(media.dicomdir())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an orphan or a missing file is an error here
        read = FileSet(tmp_path / "DICOMDIR")
    assert len(read) == len(bodies)
    for instance in read:  # each record names the file holding the instance it says
        assert pydicom.dcmread(instance.path).SOPInstanceUID == instance.SOPInstanceUID
    by_sop = {i.SOPInstanceUID: i for i in read}
    assert by_sop[ct.SOPInstanceUID].node.record_type == "IMAGE"
    assert by_sop[report.SOPInstanceUID].node.record_type == "PRIVATE"
    assert by_sop[pydicom.dcmread(get_testdata_file("rtdose.dcm")).SOPInstanceUID].node.record_type == "RT DOSE"
    # The CT study holds its two series; the invented numbers are 1, 2, 3 in order.
    study = by_sop[ct.SOPInstanceUID].node.parent.parent
    assert len(study.children) == 2
    added = [i for i in read if i.node.parent.key == series and i.node.record_type == "IMAGE"]
    assert sorted(int(i.InstanceNumber) for i in added) == [1, 2, 3]
    assert {str(i.node.parent.parent._record.StudyID) for i in added} == {str(ct.StudyID)}


@pytest.mark.slow
def test_a_long_series_reads_back_whole(tmp_path: Path) -> None:
    """1,200 images of one series (pydicom's own FileSet compares each added instance with
    every other: 20 s for 3,000): File IDs in order within 8 characters a component, and
    every record reached through the offsets."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    media = MediaFileSet()
    folder = tmp_path / "PT000000" / "ST000000" / "SE000000"
    folder.mkdir(parents=True)
    for number in range(1200):
        source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        source.InstanceNumber = number + 1
        body = _body(source)
        assert media.add(body) == f"PT000000/ST000000/SE000000/IM{number:06d}"
        (folder / f"IM{number:06d}").write_bytes(body)
    (tmp_path / "DICOMDIR").write_bytes(media.dicomdir())
    read = FileSet(tmp_path / "DICOMDIR")
    assert len(read) == 1200
    assert [int(i.InstanceNumber) for i in read] == list(range(1, 1201))
