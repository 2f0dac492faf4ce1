"""The whole PS3.15 table, every action and option, against a corpus planted with tokens.

Expectations come from the table (the standard's data), never from the engine's output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage

from anonymize import (
    DeidentificationPolicy,
    ProfileOption,
    PseudonymKeys,
    deidentify,
    load_profile,
    pseudonymize_accession_number,
    pseudonymize_patient_id,
)
from anonymize.profile import ProfileRow
from gateway.sample_study import SampleStudySpec, build_sample_study
from imaging import encode_dataset

SECRET = b"profile-test-secret-0123456789abcdef"
OVERRIDDEN = {0x00100010, 0x00100020, 0x00080050}  # always keyed pseudonyms
IDENTIFYING_CORE = {0x00080016, 0x00080018, 0x0020000D, 0x0020000E}
STANDARDS = Path(__file__).resolve().parents[3] / "shared" / "standards"
#: The 2026c basic-profile table, copied into the repository (see tests/data/standards).
PROFILE_2026C = Path(__file__).resolve().parents[1] / "data" / "standards" / "dicom-ps3.15-e1-1" / "basic_profile_2026c.json"
TEXT_VRS = {"PN", "LO", "SH", "LT", "ST", "UT", "UC", "CS", "AE", "UR"}


def _vr(tag: int) -> str | None:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None  # a 2026c tag pydicom 3.0 does not know


def _token(index: int) -> str:
    return f"TKN{index:05d}Q"


def _planted_rows() -> list[tuple[int, ProfileRow]]:
    """Every public row with a concrete tag, plus one member of each repeating group."""
    profile = load_profile()
    rows = [(tag, row) for tag, row in profile.rows.items()
            if tag >> 16 != 0x0002 and tag not in IDENTIFYING_CORE and tag >> 16 != 0xFFFA
            and tag != 0xFFFCFFFC and tag >> 16 != 0x0000]
    for mask, value, row in profile.masked_rows:
        concrete = value | 0x00020000 if value >> 24 in (0x50, 0x60) else value
        if concrete & 0xFFFF == 0:
            concrete |= 0x3000  # (50xx,xxxx) Curve Data: any element but the group length
        rows.append((concrete, row))
    return sorted(rows, key=lambda pair: pair[0])


def _element(tag: int, index: int, tokens: dict[int, str]) -> DataElement | None:
    vr = _vr(tag)
    token = _token(index)
    if vr is None:
        tokens[tag] = token
        return DataElement(tag, "UN", token.encode())
    if vr == "SQ":
        inner = Dataset()
        inner.ReferringPhysicianName = f"{token}^NESTED"
        inner.ReferencedSOPInstanceUID = f"1.2.998.{index}"  # shows whether UIDs are kept
        inner.TextValue = f"free text {index}"  # unlisted: shows dummy vs clean vs keep
        tokens[tag] = token
        return DataElement(tag, "SQ", Sequence([inner]))
    if vr == "UI":
        uid = f"1.2.999.{index}"
        tokens[tag] = uid
        return DataElement(tag, "UI", uid)
    if tag == 0x00080201:  # Timezone Offset From UTC: an SH that means &HHMM (no token fits)
        return DataElement(tag, "SH", "+0100")
    if vr in TEXT_VRS or " or " in vr and "OB" not in vr:
        tokens[tag] = token
        return DataElement(tag, vr.split(" or ")[0], token)
    if vr == "DA":
        return DataElement(tag, "DA", "20200315")
    if vr == "DT":
        return DataElement(tag, "DT", "20200315101112")
    if vr == "TM":
        return DataElement(tag, "TM", "101112")
    if vr in ("OB", "OW", "OB or OW", "UN"):
        tokens[tag] = token
        return DataElement(tag, "OB", token.encode() + b"\x00")
    return None  # numbers and the like carry no token


def _corpus() -> tuple[Dataset, dict[int, str]]:
    """A CT instance with a token in every string-valued attribute of the table, the same
    attributes two sequence levels deep, unknown tags, and a private block with a private
    sequence."""
    dataset = build_sample_study(SampleStudySpec(ct_slices=1, mr_slices=0, ct_size=8))[0]
    tokens: dict[int, str] = {}
    for index, (tag, _row) in enumerate(_planted_rows()):
        if tag in OVERRIDDEN:
            continue
        element = _element(tag, index, tokens)
        if element is not None:
            dataset.add(element)
    # Depth two: an unlisted (kept) sequence holding another, holding table attributes.
    deep = Dataset()
    deep.PatientName = "TKNDEEP01Q^NAME"
    deep.InstitutionName = "TKNDEEP02Q"
    deep.PatientAddress = "TKNDEEP03Q"
    deep.ReferencedSOPInstanceUID = "1.2.999.424242"
    middle = Dataset()
    middle.RadionuclideCodeSequence = Sequence([deep])
    middle.OperatorsName = "TKNDEEP04Q"
    dataset.RadiopharmaceuticalInformationSequence = Sequence([middle])
    # A private block with a private sequence.
    block = dataset.private_block(0x0011, "ACME TEST 1.0", create=True)
    block.add_new(0x01, "LO", "TKNPRIV01Q")
    private_item = Dataset()
    private_item.PatientName = "TKNPRIV02Q"
    private_item.add_new(0x00130010, "LO", "ACME NESTED")
    private_item.add_new(0x00131001, "LO", "TKNPRIV03Q")
    block.add_new(0x02, "SQ", Sequence([private_item]))
    return dataset, tokens


def _policy(*options: ProfileOption) -> DeidentificationPolicy:
    """The options as the standard writes them (Clean Descriptors on its whole column)."""
    return DeidentificationPolicy(PseudonymKeys(SECRET), "site-a", options=frozenset(options),
                                  cleaned_descriptors=None)


def _deidentified(*options: ProfileOption) -> tuple[Dataset, bytes, dict[int, str], Dataset]:
    original, tokens = _corpus()
    dataset = pydicom.dcmread(DicomBytesIO(encode_dataset(original)))
    deidentify(dataset, _policy(*options))
    return dataset, encode_dataset(dataset), tokens, original


@pytest.fixture(scope="module")
def basic() -> tuple[Dataset, bytes, dict[int, str], Dataset]:
    return _deidentified()


def test_table_covers_the_2026c_edition_and_the_special_rows() -> None:
    profile = load_profile()
    assert len(profile.rows) + len(profile.masked_rows) >= 655
    assert profile.private_row.basic.value == "X"
    masked = {row.name for _, _, row in profile.masked_rows}
    assert {"Curve Data", "Overlay Data", "Overlay Comments"} <= masked
    unknown_to_pydicom = [t for t in profile.rows if _vr(t) is None]
    assert len(unknown_to_pydicom) >= 20  # matched by number even though pydicom lacks them


def test_packaged_table_is_the_generated_one() -> None:
    """The shipped JSON is what scripts/generate_profile_table.py makes of the standard."""
    shared = STANDARDS / "dicom-ps3.15-e1-1" / "basic_profile_2026c.json"
    if shared.exists():  # the repository's copy is the shared table, unchanged
        assert PROFILE_2026C.read_bytes() == shared.read_bytes()
    new = json.loads(PROFILE_2026C.read_text())
    assert len(new["rows"]) >= 655
    profile = load_profile()
    for row in new["rows"]:
        tag = int(row["tag"].strip("()").replace(",", ""), 16)
        found = profile.row_for(tag)
        assert found is not None and found.basic.value == row["basicProfile"], row


def test_no_token_uid_name_or_birth_date_survives(basic: tuple[Dataset, bytes, dict[int, str], Dataset]) -> None:
    _dataset, encoded, tokens, original = basic
    leaked = [t for t in tokens.values() if t.encode() in encoded]
    assert leaked == []
    for fixed in ("TKNDEEP01Q", "TKNDEEP02Q", "TKNDEEP03Q", "TKNDEEP04Q", "TKNPRIV01Q",
                  "TKNPRIV02Q", "TKNPRIV03Q", "1.2.999.424242", "ACME TEST"):
        assert fixed.encode() not in encoded, fixed
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID",
                    "PatientBirthDate", "AccessionNumber"):
        assert str(original.get(keyword)).encode() not in encoded, keyword
    assert b"DUPONT" not in encoded


def _outcome(dataset: Dataset, tag: int, planted: str | None) -> str:
    if tag not in dataset:
        return "X"
    value = dataset[tag].value
    if value in (None, "", b"") or (isinstance(value, Sequence) and len(value) == 0):
        return "Z"
    if planted is not None and (value == planted or value == planted.encode()):
        return "K"
    return "changed"


def test_every_row_gets_an_action_allowed_by_the_table(basic: tuple[Dataset, bytes, dict[int, str], Dataset]) -> None:
    dataset, _encoded, tokens, original = basic
    allowed = {"X": {"X"}, "Z": {"Z"}, "D": {"changed"}, "U": {"changed"},
               "X/Z": {"X", "Z", "changed"}, "X/D": {"X", "Z", "changed"},
               "Z/D": {"Z", "changed"}, "X/Z/D": {"X", "Z", "changed"},
               "X/Z/U*": {"X", "Z", "changed"}}
    checked = 0
    for tag, row in _planted_rows():
        if tag in OVERRIDDEN or tag not in original:
            continue
        outcome = _outcome(dataset, tag, tokens.get(tag))
        assert outcome in allowed[row.basic.value], (f"{tag:08X}", row.name, row.basic, outcome)
        assert outcome != "K", (f"{tag:08X}", row.name)
        checked += 1
    assert checked >= 600


def test_uids_are_remapped_by_the_key_at_any_depth(basic: tuple[Dataset, bytes, dict[int, str], Dataset]) -> None:
    dataset, _encoded, _tokens, original = basic
    keys = PseudonymKeys(SECRET)
    assert dataset.SOPInstanceUID == keys.uid(str(original.SOPInstanceUID))
    assert dataset.FrameOfReferenceUID == keys.uid(str(original.FrameOfReferenceUID))
    deep = dataset.RadiopharmaceuticalInformationSequence[0].RadionuclideCodeSequence[0]
    assert deep.ReferencedSOPInstanceUID == keys.uid("1.2.999.424242")
    assert "PatientName" not in deep or str(deep.PatientName) != "TKNDEEP01Q^NAME"


def test_compound_actions_follow_the_iod_attribute_type() -> None:
    """CT Image IOD: Content Date is Type 2 (→ empty), Institution Name Type 3 (→ removed);
    Basic Text SR: Content Date is Type 1 (→ dummy)."""
    ct = build_sample_study(SampleStudySpec(ct_slices=1, mr_slices=0, ct_size=8))[0]
    ct.InstitutionName = "HOPITAL"
    deidentify(ct, _policy())
    assert ct.ContentDate == "" or ct.ContentDate is None
    assert "InstitutionName" not in ct
    sr = build_sample_study(SampleStudySpec(ct_slices=1, mr_slices=0, ct_size=8))[0]
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
    deidentify(sr, _policy())
    assert sr.ContentDate == "19000101"


def _leaves(dataset: Dataset, path: tuple[int, ...] = ()) -> dict[tuple[int, ...], object]:
    """Every value in the dataset by its tag path; a sequence contributes its items' leaves."""
    leaves: dict[tuple[int, ...], object] = {}
    for element in dataset:
        key = (*path, int(element.tag))
        if element.VR == "SQ":
            leaves[key] = len(element.value)
            for number, item in enumerate(element.value):
                leaves.update(_leaves(item, (*key, -number - 1)))
        else:
            leaves[key] = element.value
    return leaves


@pytest.mark.parametrize("option", [o for o in ProfileOption if o is not ProfileOption.RETAIN_SAFE_PRIVATE])
def test_each_option_changes_exactly_its_rows(option: ProfileOption) -> None:
    """Every value the option changes belongs to a row (or sits under a row) of the option's
    column, and every planted row of that column changes."""
    base, _, _, original = _deidentified()
    with_option, _, _, _ = _deidentified(option)
    column = {tag for tag, row in _planted_rows() if option.value in row.options}
    column |= {int(tag, 16) for tag, row in
               ((r.tag, r) for r in load_profile().rows.values()) if option.value in row.options}
    before, after = _leaves(base), _leaves(with_option)
    ignore = {0x00120063, 0x00120064, 0x00280303}  # the method record names the option
    changed = {path for path in before.keys() | after.keys()
               if before.get(path) != after.get(path) and path[0] not in ignore}
    unexplained = [p for p in changed if not any(t in column for t in p if t >= 0)]
    assert unexplained == []
    expected = {tag for tag in column if tag in original and tag not in OVERRIDDEN}
    if option is ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES:
        # A binary (OB) timestamp cannot be shifted: the Basic Profile action stands.
        expected -= {t for t in expected if original[t].VR in ("OB", "OW", "UN")}
    # "Clean" needs text to clean: a binary or AE value under a C falls back to the Basic
    # Profile action (overlay bitmaps under Clean Graphics excepted, kept as they are).
    profile = load_profile()
    expected -= {t for t in expected
                 if (profile.row_for(t) or profile.private_row).options.get(option.value) == "C"
                 and str(original[t].VR).split(" or ")[0] in ("OB", "OW", "UN", "AE")
                 and not (option is ProfileOption.CLEAN_GRAPHICS and t >> 24 == 0x60)}
    assert expected <= {p[0] for p in changed}


def test_retain_safe_private_keeps_listed_private_attributes_only() -> None:
    dataset = build_sample_study(SampleStudySpec(ct_slices=1, mr_slices=0, ct_size=8))[0]
    block = dataset.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    block.add_new(0x0C, "IS", "1000")  # B_value: on the safe list
    block.add_new(0x77, "LO", "TKNNOTSAFE")  # not on the list
    encoded = encode_dataset(dataset)
    kept = pydicom.dcmread(DicomBytesIO(encoded))
    deidentify(kept, _policy(ProfileOption.RETAIN_SAFE_PRIVATE))
    block_after = kept.private_block(0x0019, "SIEMENS MR HEADER")
    assert block_after[0x0C].value == "1000"
    assert 0x0C in block_after and (0x0019 << 16 | block_after.block_start + 0x77) not in kept
    assert b"TKNNOTSAFE" not in encode_dataset(kept)
    removed = pydicom.dcmread(DicomBytesIO(encoded))
    deidentify(removed, _policy())
    assert not any(e.tag.is_private for e in removed)


def test_clean_descriptors_redacts_identity_and_keeps_clinical_words() -> None:
    dataset = build_sample_study(SampleStudySpec(ct_slices=1, mr_slices=0, ct_size=8))[0]
    dataset.StudyDescription = "CT THORAX DUPONT 22/07/1984"
    deidentify(dataset, _policy(ProfileOption.CLEAN_DESCRIPTORS))
    assert dataset.StudyDescription.startswith("CT THORAX ")
    assert "DUPONT" not in dataset.StudyDescription and "1984" not in dataset.StudyDescription


def test_structured_report_text_is_dummied_or_cleaned() -> None:
    def report() -> Dataset:
        dataset = build_sample_study(SampleStudySpec(ct_slices=1, mr_slices=0, ct_size=8))[0]
        text = Dataset()
        text.ValueType = "TEXT"
        text.TextValue = "Patient DUPONT seen, nodule 4 mm"
        concept = Dataset()
        concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "121071", "DCM", "Finding"
        text.ConceptNameCodeSequence = Sequence([concept])
        dataset.ContentSequence = Sequence([text])
        return dataset

    dummied = report()
    deidentify(dummied, _policy())
    assert dummied.ContentSequence[0].TextValue == "ANONYMIZED"
    cleaned = report()
    deidentify(cleaned, _policy(ProfileOption.CLEAN_STRUCTURED_CONTENT))
    item = cleaned.ContentSequence[0]
    assert "nodule 4 mm" in item.TextValue and "DUPONT" not in item.TextValue
    assert item.ConceptNameCodeSequence[0].CodeValue == "121071"


def test_method_is_recorded_with_cid_7050_codes() -> None:
    dataset, _, _, _ = _deidentified(ProfileOption.RETAIN_UIDS, ProfileOption.CLEAN_DESCRIPTORS)
    codes = [item.CodeValue for item in dataset.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113105", "113110"]
    assert dataset.PatientIdentityRemoved == "YES"
    assert dataset.LongitudinalTemporalInformationModified == "REMOVED"
    assert all(len(v) <= 64 for v in dataset.DeidentificationMethod)


def test_full_and_modified_dates_exclude_each_other() -> None:
    with pytest.raises(ValueError):
        _policy(ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES,
                ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES)


def test_pseudonym_lookup_functions_match_what_deidentify_writes() -> None:
    keys = PseudonymKeys(SECRET)
    dataset = build_sample_study(SampleStudySpec(ct_slices=1, mr_slices=0, ct_size=8, with_ins=False))[0]
    original_id, issuer = str(dataset.PatientID), str(dataset.IssuerOfPatientID)
    original_accession = str(dataset.AccessionNumber)
    deidentify(dataset, _policy())
    assert dataset.PatientID == pseudonymize_patient_id(keys, original_id, site_id="site-a", issuer=issuer)
    assert dataset.AccessionNumber == pseudonymize_accession_number(keys, original_accession, site_id="site-a")
    with_ins = build_sample_study(SampleStudySpec(ct_slices=1, mr_slices=0, ct_size=8))[0]
    ins = str(with_ins.OtherPatientIDsSequence[0].PatientID)
    deidentify(with_ins, _policy())
    assert with_ins.PatientID == pseudonymize_patient_id(keys, ins, site_id="any", is_ins=True)


_CHILD = """
import sys, pydicom
from anonymize import DeidentificationPolicy, PseudonymKeys, deidentify
dataset = pydicom.dcmread(sys.argv[1])
deidentify(dataset, DeidentificationPolicy(PseudonymKeys(sys.argv[2].encode()), "site-a"))
print(dataset.StudyInstanceUID, dataset.SOPInstanceUID, dataset.PatientID, dataset.StudyDate)
"""


def test_pseudonyms_are_identical_in_two_separate_processes(tmp_path: Path) -> None:
    dataset = build_sample_study(SampleStudySpec(ct_slices=1, mr_slices=0, ct_size=8))[0]
    path = tmp_path / "in.dcm"
    dataset.save_as(path, enforce_file_format=True)
    runs = [subprocess.run([sys.executable, "-c", _CHILD, str(path), SECRET.decode()],
                           capture_output=True, text=True, check=True).stdout for _ in range(2)]
    assert runs[0] == runs[1] and runs[0].startswith("2.25.")
    local = pydicom.dcmread(path)
    deidentify(local, _policy(ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES))
    assert runs[0].split() == [str(local.StudyInstanceUID), str(local.SOPInstanceUID),
                               str(local.PatientID), str(local.StudyDate)]


def _dcmdump_errors(path: Path) -> list[str]:
    result = subprocess.run(["dcmdump", "-q", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [line for line in (result.stderr + result.stdout).splitlines() if line.startswith("E:")]


def _real_files() -> Iterator[Path]:
    from pydicom.data import get_testdata_file

    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtdose.dcm", "test-SR.dcm",
                 "emri_small.dcm", "waveform_ecg.dcm", "reportsi.dcm", "liver.dcm",
                 "MR-SIEMENS-DICOM-WithOverlays.dcm"):
        found = get_testdata_file(name)
        if found:
            yield Path(str(found))


@pytest.mark.parametrize("source", list(_real_files()), ids=lambda p: p.name)
def test_output_is_valid_part10_read_by_pydicom_and_dcmdump(source: Path, tmp_path: Path,
                                                           dcmtk: dict[str, str]) -> None:
    dataset = pydicom.dcmread(source)
    pixels = dataset.get("PixelData")
    deidentify(dataset, _policy(ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES))
    out = tmp_path / "out.dcm"
    out.write_bytes(encode_dataset(dataset))
    again = pydicom.dcmread(out)
    assert again.file_meta.MediaStorageSOPInstanceUID == again.SOPInstanceUID
    assert again.file_meta.MediaStorageSOPClassUID == again.SOPClassUID
    assert again.get("PixelData") == pixels  # pixels untouched without a mask
    assert _dcmdump_errors(out) == []


def test_ct_iod_is_known_to_the_type_tables() -> None:
    from anonymize import iod_types

    types = iod_types(str(CTImageStorage), load_profile().compound_keywords)
    assert types is not None and len(types) > 10
