"""De-identification: planted identity gone, pseudonyms keyed and stable, INS links sites."""

from __future__ import annotations

import copy
import datetime as dt
import re

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from anonymize import (
    Action,
    DeidentificationError,
    DeidentificationPolicy,
    PseudonymKeys,
    WeakSecretError,
    deidentify,
    load_profile,
)
from gateway.sample_study import PlantedIdentity, SampleStudySpec, build_sample_study
from worker import encode_dataset

SECRET = b"unit-test-secret-0123456789abcdef"
UID_PATTERN = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")


def _policy(site: str = "site-a", secret: bytes = SECRET) -> DeidentificationPolicy:
    return DeidentificationPolicy(keys=PseudonymKeys(secret), site_id=site)


def _sample(**spec_fields: object) -> list[Dataset]:
    return build_sample_study(SampleStudySpec(ct_slices=2, mr_slices=1, ct_size=64, mr_size=32,
                                              **spec_fields))  # type: ignore[arg-type]


def test_profile_table_has_every_row_and_repeating_groups() -> None:
    profile = load_profile()
    assert len(profile.rows) + len(profile.masked_rows) + 1 >= 655
    assert profile.row_for(0x00100010).basic is Action.ZERO  # Patient's Name
    assert profile.row_for(0x00080018).basic is Action.UID  # SOP Instance UID
    assert profile.row_for(0x60023000) is not None  # Overlay Data, any 60xx group
    assert profile.row_for(0x50100000) is not None  # Curve Data
    assert profile.row_for(0x00280010) is None  # Rows: not in the profile, kept
    assert "PS3.15" in profile.attribution and "2026c" in profile.attribution


def test_uid_pseudonyms_are_valid_deterministic_and_keyed() -> None:
    keys = PseudonymKeys(SECRET)
    uid = keys.uid("1.2.3.4.5")
    assert UID_PATTERN.match(uid) and len(uid) <= 64
    assert keys.uid("1.2.3.4.5") == uid
    assert keys.uid("1.2.3.4.6") != uid
    assert PseudonymKeys(b"another-secret-0123456789abcdef").uid("1.2.3.4.5") != uid


def test_weak_secret_is_refused() -> None:
    with pytest.raises(WeakSecretError):
        PseudonymKeys(b"short")


def test_no_planted_identifier_survives_in_the_encoded_instance() -> None:
    planted = PlantedIdentity()
    for dataset in _sample():
        originals = {str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID),
                     str(dataset.SOPInstanceUID), str(dataset.FrameOfReferenceUID)}
        deidentify(dataset, _policy())
        encoded = encode_dataset(dataset)
        for value in [*planted.strings(), *originals]:
            assert value.encode() not in encoded, f"{value!r} leaked"
        assert dataset.PatientIdentityRemoved == "YES"
        assert UID_PATTERN.match(str(dataset.StudyInstanceUID))
        assert dataset.file_meta.MediaStorageSOPInstanceUID == dataset.SOPInstanceUID
        assert not any(element.tag.is_private for element in dataset)
        assert not dataset.get("PatientBirthDate")
        codes = [item.CodeValue for item in dataset.DeidentificationMethodCodeSequence]
        assert codes == ["113100", "113107"]


def test_dates_shift_by_one_patient_offset_and_keep_intervals() -> None:
    first = _sample()[0]
    second = copy.deepcopy(first)
    second.StudyDate = "20261201"  # a later study of the same patient
    for dataset in (first, second):
        deidentify(dataset, _policy())
    original_gap = dt.date(2026, 12, 1) - dt.date(2026, 11, 20)
    shifted = [dt.datetime.strptime(d.StudyDate, "%Y%m%d").date() for d in (first, second)]
    assert shifted[1] - shifted[0] == original_gap
    assert shifted[0] < dt.date(2026, 11, 20)
    assert first.ContentDate == first.StudyDate  # same day before, same day after


def test_ins_links_one_patient_across_two_sites_with_different_local_ids() -> None:
    site_a = _sample()[0]
    site_b = _sample(seed=2)[0]
    site_b.PatientID = "LOCAL-B-999"
    site_b.IssuerOfPatientID = "CLINIQUE-B"
    deidentify(site_a, _policy("site-a"))
    deidentify(site_b, _policy("site-b"))
    assert site_a.PatientID == site_b.PatientID
    assert site_a.StudyDate[:4].isdigit() and site_a.StudyDate == site_b.StudyDate


def test_without_ins_the_local_id_is_qualified_by_its_issuer() -> None:
    one = _sample(with_ins=False)[0]
    other = _sample(with_ins=False)[0]
    other.IssuerOfPatientID = "ANOTHER-HOSPITAL"  # same local number, another hospital
    deidentify(one, _policy())
    deidentify(other, _policy())
    assert one.PatientID != other.PatientID


def test_references_are_remapped_like_the_instances_they_point_to() -> None:
    target, referrer = _sample()[:2]
    reference = Dataset()
    reference.ReferencedSOPClassUID = target.SOPClassUID
    reference.ReferencedSOPInstanceUID = target.SOPInstanceUID
    referrer.ReferencedImageSequence = Sequence([reference])
    deidentify(target, _policy())
    deidentify(referrer, _policy())
    mapped = referrer.ReferencedImageSequence[0]
    assert mapped.ReferencedSOPInstanceUID == target.SOPInstanceUID
    assert mapped.ReferencedSOPClassUID == target.SOPClassUID  # class UIDs are not identifying


def test_accession_pseudonym_is_recomputable_from_the_original() -> None:
    dataset = _sample()[0]
    original = str(dataset.AccessionNumber)
    deidentify(dataset, _policy())
    assert dataset.AccessionNumber == PseudonymKeys(SECRET).accession_number(original, "site:site-a")
    assert len(dataset.AccessionNumber) <= 16


def test_real_ct_with_private_tags_is_cleaned() -> None:
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    name = str(dataset.PatientName)
    deidentify(dataset, _policy())
    encoded = encode_dataset(dataset)
    assert name.encode() not in encoded
    assert pydicom.dcmread(pydicom.filebase.DicomBytesIO(encoded)).pixel_array.shape == (128, 128)


def test_dataset_without_uids_is_refused() -> None:
    dataset = _sample()[0]
    del dataset.SOPInstanceUID
    with pytest.raises(DeidentificationError):
        deidentify(dataset, _policy())


def _french_ins(dataset: Dataset, ins: str, *, other: bool) -> None:
    """The INS as French sources write it (DRIM-M, PID-3
    `ins^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.10&ISO^INS`): a namespace in
    IssuerOfPatientID, the ANS OID in the qualifiers; as PatientID or as another ID."""
    item = Dataset() if other else dataset
    qualifier = Dataset()
    qualifier.UniversalEntityID = "1.2.250.1.213.1.4.10"
    qualifier.UniversalEntityIDType = "ISO"
    qualifier.IdentifierTypeCode = "INS"
    item.PatientID = ins
    item.IssuerOfPatientID = "ASIP-SANTE-INS-NIR"
    item.IssuerOfPatientIDQualifiersSequence = Sequence([qualifier])
    if other:
        dataset.OtherPatientIDsSequence = Sequence([item])


@pytest.mark.parametrize("other", [False, True])
def test_the_ins_written_the_french_way_links_the_patient_across_sites(other: bool) -> None:
    ins = "279035121518989"
    with_oid = _sample(with_ins=False)[0]
    with_oid.PatientID, with_oid.IssuerOfPatientID = ins, "1.2.250.1.213.1.4.10"
    french = _sample(with_ins=False, seed=2)[0]
    if other:
        french.PatientID, french.IssuerOfPatientID = "IPP-B-42", "CLINIQUE-B"
    _french_ins(french, ins, other=other)
    deidentify(with_oid, _policy("site-a"))
    deidentify(french, _policy("site-b"))
    assert french.PatientID == with_oid.PatientID
