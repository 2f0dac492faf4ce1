"""Leak paths found by the security review, each pinned by a test."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from anonymize import (
    BurnedInAnnotationRisk,
    DeidentificationPolicy,
    InvalidUIDError,
    ProfileOption,
    PseudonymKeys,
    TextCleaner,
    deidentify,
)
from imaging import encode_dataset

SECRET = b"hardening-test-secret-0123456789abcdef"


def _policy(*options: ProfileOption) -> DeidentificationPolicy:
    chosen = frozenset(options) or frozenset({ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES})
    return DeidentificationPolicy(PseudonymKeys(SECRET), "site", options=chosen)


def _base() -> Dataset:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = CTImageStorage
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.100"
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = "1.2.3.4.200", "1.2.3.4.300"
    dataset.FrameOfReferenceUID = "1.2.3.4.400"
    dataset.PatientName, dataset.PatientID = "SECRETNAME^JOHN", "SECRETID123"
    dataset.PatientBirthDate, dataset.Modality = "19640229", "CT"
    return dataset


def _out(dataset: Dataset, policy: DeidentificationPolicy | None = None) -> bytes:
    dataset = pydicom.dcmread(DicomBytesIO(encode_dataset(dataset)))
    deidentify(dataset, policy or _policy())
    return encode_dataset(dataset)


def test_preamble_is_cleared() -> None:
    dataset = _base()
    dataset.preamble = b"SECRETNAME^JOHN 19640229".ljust(128, b"\0")
    assert b"SECRETNAME" not in _out(dataset)


def test_elements_in_the_private_creator_range_are_not_kept_blindly() -> None:
    dataset = _base()
    dataset.add_new(0x00090011, "PN", "SECRETNAME^JOHN")
    dataset.add_new(0x00090013, "DA", "19640229")
    out = _out(dataset, _policy(ProfileOption.RETAIN_SAFE_PRIVATE))
    assert b"SECRETNAME" not in out and b"19640229" not in out


def test_default_policy_keeps_structured_reports_valid(tmp_path: Path, dcmtk: dict[str, str]) -> None:
    source = get_testdata_file("test-SR.dcm")
    dataset = pydicom.dcmread(str(source))
    deidentify(dataset, _policy())
    path = tmp_path / "sr.dcm"
    path.write_bytes(encode_dataset(dataset))
    result = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith(("E:", "F:"))]


def test_identifying_attributes_missing_from_the_table_are_handled() -> None:
    dataset = _base()
    dataset.add_new(0x00100033, "LO", "19640229")  # birth date, alternative calendar
    dataset.RetrieveURL = "https://pacs.hopital-secret.fr/studies/1.2.3.4.200"
    dataset.TargetFrameOfReferenceUID = "1.2.3.4.400"
    dataset.add_new(0x0040A067, "PN", "SECRETAUTHOR^X")  # retired, unlisted person name
    out = pydicom.dcmread(DicomBytesIO(_out(dataset)))
    raw = encode_dataset(out)
    assert b"19640229" not in raw and b"hopital-secret" not in raw and b"SECRETAUTHOR" not in raw
    assert out.TargetFrameOfReferenceUID == out.FrameOfReferenceUID  # remapped alike


def test_unknown_public_tags_read_as_un_are_removed() -> None:
    dataset = _base()
    dataset.add_new(0x00421234, "UN", b"SECRETNAME^JOHN SECRETID123 ")
    assert b"SECRETID123" not in _out(dataset)


def test_safe_private_uids_are_remapped_and_wrong_vrs_refused() -> None:
    dataset = _base()
    block = dataset.private_block(0x0099, "NQHeader", create=True)
    block.add_new(0x02, "UI", "1.2.3.4.300")
    gems = dataset.private_block(0x0043, "GEMS_PARM_01", create=True)
    gems.add_new(0x27, "OL", b"SECRETID123 ")
    out = _out(dataset, _policy(ProfileOption.RETAIN_SAFE_PRIVATE))
    assert b"1.2.3.4.300" not in out and b"SECRETID123" not in out


def test_well_known_uids_are_not_remapped() -> None:
    dataset = _base()
    dataset.SynchronizationFrameOfReferenceUID = "1.2.840.10008.15.1.1"
    deidentify(dataset, _policy())
    assert dataset.SynchronizationFrameOfReferenceUID == "1.2.840.10008.15.1.1"


def test_missing_patient_id_gets_a_pseudonym_of_its_own() -> None:
    first, second = _base(), _base()
    for dataset, study in ((first, "1.2.3.9.1"), (second, "1.2.3.9.2")):
        del dataset.PatientID
        dataset.StudyInstanceUID = study
        deidentify(dataset, _policy())
    assert first.PatientID and first.PatientID != second.PatientID


def test_overlay_planes_go_whole_with_their_data() -> None:
    dataset = _base()
    dataset.add_new(0x60000010, "US", 8)
    dataset.add_new(0x60000022, "LO", "SECRETNAME overlay")
    dataset.add_new(0x60003000, "OW", b"\x00" * 8)
    deidentify(dataset, _policy())
    assert not [e for e in dataset if e.tag.group == 0x6000]


def test_recognizable_visual_features_are_refused() -> None:
    dataset = _base()
    dataset.RecognizableVisualFeatures = "YES"
    with pytest.raises(BurnedInAnnotationRisk):
        deidentify(dataset, _policy())


def test_cleaner_finds_names_at_any_depth_and_spelled_dates() -> None:
    dataset = _base()
    item = Dataset()
    item.PersonName = "SMITHERSON^ANNA"
    dataset.ContentSequence = Sequence([item])
    dataset.PatientName = "山田^太郎"
    cleaner = TextCleaner(dataset)
    text = cleaner.clean("Dr Smitherson saw 山田太郎様 on 3 March 2021 and 12 janvier 2022")
    for leaked in ("Smitherson", "山田", "太郎", "March", "janvier"):
        assert leaked not in text


def test_an_invalid_uid_kept_under_retain_uids_is_refused_without_quoting_it() -> None:
    nested = _base()
    reference = Dataset()
    reference.ReferencedSOPClassUID = CTImageStorage
    reference.ReferencedSOPInstanceUID = "1.2.840.99.0123"  # leading zero, two levels down
    nested.ReferencedImageSequence = Sequence([reference])
    with pytest.raises(InvalidUIDError, match="ReferencedSOPInstanceUID") as refused:
        deidentify(nested, _policy(ProfileOption.RETAIN_UIDS))
    assert "0123" not in str(refused.value) and "leading zero" in str(refused.value)
    # Without the option the same UID is replaced by a keyed 2.25 UID: nothing to refuse.
    remapped = _base()
    remapped.ReferencedImageSequence = Sequence([reference])
    deidentify(remapped, _policy())
    assert remapped.ReferencedImageSequence[0].ReferencedSOPInstanceUID.startswith("2.25.")


def test_an_invalid_sop_class_uid_is_refused_with_or_without_retain_uids() -> None:
    dataset = _base()
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.X"  # kept as it is by every profile
    with pytest.raises(InvalidUIDError, match="SOPClassUID"):
        deidentify(dataset, _policy())
