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
    InsIssuers,
    PseudonymKeys,
    WeakSecretError,
    deidentify,
    is_ins_shaped,
    load_profile,
    pseudonymize_patient_id,
)
from gateway.sample_study import PlantedIdentity, SampleStudySpec, build_sample_study
from imaging import encode_dataset

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
        assert codes == ["113100", "113105", "113107"]


def _described() -> Dataset:
    dataset = _sample()[0]
    dataset.PatientName = "DUPONT^MARIE"
    dataset.PatientBirthDate = "19840722"
    dataset.StudyDescription = "TDM THORAX DUPONT 22/07/1984"
    dataset.SeriesDescription = "AX MEDIASTIN Marie"
    dataset.ProtocolName = "THORAX INJ 1.25"
    dataset.ContrastBolusAgent = "IOMERON 350"
    dataset.ImageComments = "mayor of the town"
    dataset.Occupation = "mayor"
    dataset.AdditionalPatientHistory = "follow-up after fall"
    return dataset


def test_reading_descriptors_are_kept_cleaned_by_default_and_the_rest_removed() -> None:
    dataset = _described()
    deidentify(dataset, _policy())
    assert dataset.StudyDescription.startswith("TDM THORAX ")
    assert "DUPONT" not in dataset.StudyDescription and "1984" not in dataset.StudyDescription
    assert dataset.SeriesDescription.startswith("AX MEDIASTIN ")
    assert "Marie" not in dataset.SeriesDescription
    assert dataset.ProtocolName == "THORAX INJ 1.25"
    assert dataset.ContrastBolusAgent == "IOMERON 350"
    for keyword in ("ImageComments", "Occupation", "AdditionalPatientHistory"):
        assert keyword not in dataset, keyword


def test_the_whole_clean_descriptors_column_on_demand_and_only_descriptors_named() -> None:
    dataset = _described()
    deidentify(dataset, DeidentificationPolicy(keys=PseudonymKeys(SECRET), site_id="site-a",
                                               cleaned_descriptors=None))
    assert dataset.ImageComments == "mayor of the town"
    assert dataset.AdditionalPatientHistory == "follow-up after fall"
    with pytest.raises(ValueError, match="PatientName"):
        DeidentificationPolicy(keys=PseudonymKeys(SECRET), site_id="site-a",
                               cleaned_descriptors=frozenset({"SeriesDescription", "PatientName"}))


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


#: One INS (the DRIM-M sample's, an INS-NIR of a test patient) in each encoding French and
#: IHE sources use: (IssuerOfPatientID, qualifiers (UniversalEntityID, IdentifierTypeCode)).
DRIM_M_INS = "279035121518989"
INS_ENCODINGS: dict[str, tuple[str | None, tuple[str, str] | None]] = {
    "oid in IssuerOfPatientID": ("1.2.250.1.213.1.4.10", None),
    "namespace alone": ("ASIP-SANTE-INS-NIR", None),
    "oid in the qualifiers alone": (None, ("1.2.250.1.213.1.4.10", "INS")),
    # PID-3 279035121518989^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.10&ISO^INS
    "DRIM-M: namespace + oid + INS": ("ASIP-SANTE-INS-NIR", ("1.2.250.1.213.1.4.10", "INS")),
    "NIA namespace + oid": ("ASIP-SANTE-INS-NIA", ("1.2.250.1.213.1.4.9", "INS")),
    "production NIR oid + NH": (None, ("1.2.250.1.213.1.4.8", "NH")),
}


def _write_id(item: Dataset, value: str, issuer: str | None,
              qualifier: tuple[str, str] | None) -> None:
    item.PatientID = value
    if issuer is not None:
        item.IssuerOfPatientID = issuer
    if qualifier is not None:
        entry = Dataset()
        entry.UniversalEntityID, entry.IdentifierTypeCode = qualifier
        entry.UniversalEntityIDType = "ISO"
        item.IssuerOfPatientIDQualifiersSequence = Sequence([entry])


def _patient_written(encoding: str, *, other: bool, seed: int, local_id: str = "IPP-42",
                     ins: str = DRIM_M_INS) -> Dataset:
    """A sample instance whose patient carries `ins` in `encoding`, as PatientID or (beside
    a local ID) as an item of OtherPatientIDsSequence."""
    dataset = _sample(with_ins=False, seed=seed)[0]
    dataset.PatientID, dataset.IssuerOfPatientID = local_id, f"HOPITAL-{seed}"
    issuer, qualifier = INS_ENCODINGS[encoding]
    if other:
        item = Dataset()
        _write_id(item, ins, issuer, qualifier)
        dataset.OtherPatientIDsSequence = Sequence([item])
    else:
        del dataset.IssuerOfPatientID
        _write_id(dataset, ins, issuer, qualifier)
    return dataset


def test_the_ins_links_the_patient_across_sites_in_every_encoding() -> None:
    """The same patient imaged at several sites, each writing the INS its own way (and
    each as PatientID or among the other IDs), gets one pseudonym: the INS's."""
    pseudonyms = set()
    for number, encoding in enumerate(INS_ENCODINGS):
        for other in (False, True):
            dataset = _patient_written(encoding, other=other, seed=10 + number)
            deidentify(dataset, _policy(f"site-{number}-{other}"))
            pseudonyms.add(str(dataset.PatientID))
    assert pseudonyms == {pseudonymize_patient_id(PseudonymKeys(SECRET), DRIM_M_INS,
                                                  site_id="x", is_ins=True)}


@pytest.mark.parametrize("other", [False, True])
def test_one_site_writes_the_oid_the_other_the_namespace(other: bool) -> None:
    site_a = _patient_written("oid in IssuerOfPatientID", other=other, seed=1)
    site_b = _patient_written("namespace alone", other=not other, seed=2)
    deidentify(site_a, _policy("site-a"))
    deidentify(site_b, _policy("site-b"))
    assert site_a.PatientID == site_b.PatientID


@pytest.mark.parametrize(("issuer", "qualifier"), [
    ("CLINIQUE-{site}", ("1.2.250.1.999.{site}", "INS")),  # INS type code, unknown issuer
    ("CLINIQUE-{site}", None),  # an unknown namespace
    ("ASIP-SANTE-INS-NIR", ("1.2.250.1.999.{site}", "INS")),  # INS namespace, a hospital's OID
    (None, None),  # no issuer: the site's
])
def test_an_id_no_ins_authority_issued_does_not_link_sites(
        issuer: str | None, qualifier: tuple[str, str] | None) -> None:
    """Two hospitals each issuing the local ID 279035121518989 (INS-shaped) under an issuer
    no INS authority is: two patients, two pseudonyms. An IdentifierTypeCode INS is no proof
    (any local system can write it); the issuer's OID, or else its namespace, decides."""
    pseudonyms = []
    for site in ("a", "b"):
        dataset = _sample(with_ins=False, seed=ord(site))[0]
        del dataset.IssuerOfPatientID
        _write_id(dataset, DRIM_M_INS, issuer.format(site=site) if issuer else None,
                  (qualifier[0].format(site=ord(site)), qualifier[1]) if qualifier else None)
        deidentify(dataset, _policy(f"site-{site}"))
        pseudonyms.append(str(dataset.PatientID))
    assert pseudonyms[0] != pseudonyms[1]


@pytest.mark.parametrize("value", ["12345", "279035121518988", "27903512151898", "2790351215189A9"])
def test_what_no_ins_can_be_is_the_sites_even_under_an_ins_issuer(value: str) -> None:
    """An ID under an INS issuer that is no INS (not 15 characters, a wrong key): a mapping
    error at the source. Keyed as the site's own ID, so two sites' "12345" never merge."""
    pseudonyms = []
    for site in ("a", "b"):
        dataset = _sample(with_ins=False, seed=ord(site))[0]
        _write_id(dataset, value, "ASIP-SANTE-INS-NIR", ("1.2.250.1.213.1.4.8", "INS"))
        deidentify(dataset, _policy(f"site-{site}"))
        pseudonyms.append(str(dataset.PatientID))
        assert dataset.PatientID == pseudonymize_patient_id(
            PseudonymKeys(SECRET), value, site_id=f"site-{site}", issuer="ASIP-SANTE-INS-NIR")
    assert pseudonyms[0] != pseudonyms[1]


def _with_key(number: str, corsica: str = "") -> str:
    """A NIR with its key, 97 - (number mod 97); Corsica's 2A/2B count as 19/18."""
    digits = number.replace("2A", "19").replace("2B", "18") if corsica else number
    return f"{number}{97 - int(digits) % 97:02d}"


@pytest.mark.parametrize(("value", "shaped"), [
    ("279035121518989", True), ("139061305567914", True),  # ANS test INS, a real-format one
    (_with_key("18405" + "2A" + "123456", corsica="yes"), True),
    (_with_key("18405" + "2B" + "123456", corsica="yes"), True),
    ("184052A123456" + _with_key("184052B123456", corsica="yes")[-2:], False),  # 2B's key
    ("279035121518990", False),  # wrong key
    ("1840520123456", False),  # the 13 characters without the key
    ("27903512151898X", False), ("", False),
])
def test_ins_shape_is_the_nir_key(value: str, shaped: bool) -> None:
    assert is_ins_shaped(value) is shaped


def test_the_issuers_are_settings() -> None:
    """A deployment that names another authority (or withdraws the test ones) is obeyed."""
    dataset = _patient_written("namespace alone", other=False, seed=3)
    twin = copy.deepcopy(dataset)
    deidentify(dataset, _policy())
    deidentify(twin, DeidentificationPolicy(keys=PseudonymKeys(SECRET), site_id="site-a",
                                            ins_issuers=InsIssuers(namespaces=frozenset())))
    assert dataset.PatientID != twin.PatientID


def test_the_local_id_beside_the_ins_is_pseudonymized_for_lookups() -> None:
    """With an INS and a local ID, the result carries the local ID's pseudonym too (as a
    lookup computes it), never the original."""
    keys = PseudonymKeys(SECRET)
    beside = _patient_written("DRIM-M: namespace + oid + INS", other=True, seed=4)
    result = deidentify(beside, _policy())
    assert result.patient_id == pseudonymize_patient_id(keys, DRIM_M_INS, site_id="x", is_ins=True)
    assert result.local_patient_id == pseudonymize_patient_id(
        keys, "IPP-42", site_id="site-a", issuer="HOPITAL-4")
    # the INS as PatientID, the local ID (no issuer) among the other IDs: keyed by the site
    first = _patient_written("DRIM-M: namespace + oid + INS", other=False, seed=5)
    local = Dataset()
    local.PatientID = "IPP-43"
    first.OtherPatientIDsSequence = Sequence([local])
    assert deidentify(first, _policy()).local_patient_id == pseudonymize_patient_id(
        keys, "IPP-43", site_id="site-a")
    assert "IPP-4" not in str(encode_dataset(first))
    alone = _sample(with_ins=False)[0]
    assert deidentify(alone, _policy()).local_patient_id == ""  # its PatientID says it all
