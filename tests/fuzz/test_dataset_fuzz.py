"""Hypothesis-built data sets — nested sequences (standard and private, several levels
deep), values over their VR's length, huge strings and binary values, odd VRs — sent by
C-STORE to the node and then through the worker's pipeline:

* the node answers Success or a named failure status, and what it acknowledged parses;
* the worker stores a de-identified instance or quarantines it with a reason, never
  crashes or loops; a stored instance holds none of the identifying values planted at
  any depth, nor any original UID.
"""

from __future__ import annotations

import io
import itertools
import os
import struct
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from anonymize import DeidentificationPolicy, PseudonymKeys
from dicom_node import DicomNode
from imaging import StoreStatus
from spool import Spool
from storage import FilesystemObjectStore, IndexRepository, create_index_engine, migrate
from tests.fuzz.conftest import store_bytes_as_they_are
from worker import IngestPipeline

EXAMPLES = int(os.environ.get("DGW_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=not os.environ.get("DGW_FUZZ_RANDOM"),
                suppress_health_check=list(HealthCheck))
ALLOWED = {StoreStatus.SUCCESS, StoreStatus.CANNOT_UNDERSTAND, StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
           StoreStatus.OUT_OF_RESOURCES}
MARKER = "ZQXPHI"  # planted in identifying attributes; must never reach the store

#: Identifying attributes (PS3.15 E.1-1 actions D/Z/X) with a value carrying MARKER.
IDENTIFYING = ["PatientName", "PatientID", "ReferringPhysicianName", "InstitutionName",
               "InstitutionAddress", "OperatorsName", "PerformingPhysicianName",
               "PatientAddress", "OtherPatientNames", "StationName", "RequestingPhysician",
               "PhysiciansOfRecord", "PatientBirthName", "PatientMotherBirthName",
               "AccessionNumber", "StudyID", "AdmittingDiagnosesDescription",
               "MedicalAlerts", "PatientComments", "ImageComments"]
#: Sequences the items go in: ones the profile removes or replaces (X, X/Z, D) and ones it
#: keeps, whose items it must clean level by level.
SEQUENCES = ["ReferencedImageSequence", "RequestAttributesSequence", "ReferencedStudySequence",
             "SourceImageSequence", "ContentSequence", "OtherPatientIDsSequence",
             "ReferencedPerformedProcedureStepSequence",
             "ProcedureCodeSequence", "AnatomicRegionSequence", "DerivationCodeSequence",
             "ViewCodeSequence", "ConceptNameCodeSequence", "PurposeOfReferenceCodeSequence"]
#: Harmless attributes with values of any size, over the VR's maximum length included.
PLAIN = {"CodeValue": "SH", "CodeMeaning": "LO", "CodingSchemeDesignator": "SH",
         "ReferencedSOPClassUID": "UI", "ReferencedFrameNumber": "IS", "ImageType": "CS",
         "SliceThickness": "DS", "WindowCenter": "DS"}

_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126,
                                       exclude_characters="\\"), max_size=80)


def _plain_value(keyword: str, size: int) -> str:
    vr = PLAIN[keyword]
    if vr == "UI":
        return "1.2.840.10008.5.1.4.1.1.2"
    if vr in ("IS", "DS"):
        return "1" * min(size, 40) or "0"
    return "A" * size


@st.composite
def _item(draw: st.DrawFn, depth: int) -> Dataset:
    item = Dataset()
    for keyword in draw(st.lists(st.sampled_from(IDENTIFYING), max_size=3, unique=True)):
        setattr(item, keyword, f"{MARKER}{draw(_text)[:20]}")
    for keyword in draw(st.lists(st.sampled_from(sorted(PLAIN)), max_size=3, unique=True)):
        setattr(item, keyword, _plain_value(keyword, draw(st.sampled_from([0, 1, 64, 65, 1000, 70_000]))))
    if draw(st.booleans()):
        item.ReferencedSOPInstanceUID = draw(_original_uid)
    if draw(st.booleans()):  # a private block, sometimes holding a sequence of its own
        block = item.private_block(0x0011, "FUZZ PRIVATE", create=True)
        block.add_new(0x01, "LO", f"{MARKER} private")
        if depth > 0 and draw(st.booleans()):
            block.add_new(0x02, "SQ", Sequence(draw(st.lists(_item(depth - 1), max_size=2))))
    if depth > 0:
        for keyword in draw(st.lists(st.sampled_from(SEQUENCES), max_size=2, unique=True)):
            setattr(item, keyword, Sequence(draw(st.lists(_item(depth - 1), min_size=0, max_size=3))))
    return item


_original_uid = st.integers(1, 10**12).map(lambda n: f"1.2.826.0.1.3680043.10.999.{n}")


@st.composite
def _data_set(draw: st.DrawFn) -> Dataset:
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    top = draw(_item(depth=draw(st.integers(0, 4))))
    for element in top:
        base[element.tag] = element
    if draw(st.booleans()):  # a huge binary value (private OB) or a huge text
        size = draw(st.sampled_from([1 << 16, 3 << 20]))
        block = base.private_block(0x0013, "FUZZ BIG", create=True)
        block.add_new(0x01, "OB", bytes(size))
        block.add_new(0x02, "UT", "B" * size)
    base.StudyInstanceUID = draw(_original_uid)
    base.SeriesInstanceUID = draw(_original_uid)
    base.SOPInstanceUID = draw(_original_uid)
    base.file_meta = FileMetaDataset(base.file_meta)
    base.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID
    base.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return base


def _encode(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


def _original_uids(dataset: Dataset) -> set[str]:
    found: set[str] = set()

    def visit(item: Dataset) -> None:
        for element in item:
            if element.VR == "SQ":
                for child in element.value:
                    visit(child)
            elif element.VR == "UI" and str(element.value).startswith("1.2.826.0.1.3680043.10.999."):
                found.add(str(element.value))

    visit(dataset)
    return found


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> IngestPipeline:
    root = tmp_path_factory.mktemp("pipeline")
    engine = create_index_engine(f"sqlite:///{root / 'index.sqlite3'}")
    migrate(engine)
    return IngestPipeline(FilesystemObjectStore(root / "objects"), IndexRepository(engine),
                          DeidentificationPolicy(PseudonymKeys(b"f" * 32), "site1"),
                          root / "spool", root / "quarantine")


@FUZZ
@given(dataset=_data_set())
def test_structured_data_sets_by_c_store(node: DicomNode, dataset: Dataset) -> None:
    before = set(node.spool.site_dir.glob("*/*.dcm"))
    ae = AE(ae_title="FUZZER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMGATEWAY")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(dataset)
    finally:
        if assoc.is_established:
            assoc.release()
    assert "Status" in status, "the node aborted a well-formed association"
    assert int(status.Status) in ALLOWED, hex(int(status.Status))
    for new in set(node.spool.site_dir.glob("*/*.dcm")) - before:
        received = pydicom.dcmread(new)  # what was acknowledged parses, sequences and all
        assert received.SOPInstanceUID == dataset.SOPInstanceUID
        new.unlink()


_CASES = itertools.count(1)


@FUZZ
@given(dataset=_data_set())
def test_structured_data_sets_through_the_pipeline(pipeline: IngestPipeline, dataset: Dataset) -> None:
    number = next(_CASES)  # a study of its own for each case (drawn UIDs may repeat)
    dataset.StudyInstanceUID = f"1.2.826.0.1.3680043.10.999.{number}.1"
    dataset.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.999.{number}.2"
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.999.{number}.3"
    batch = f"fuzz-{number}"
    Spool(pipeline.spool_root, "site1").write(batch, str(dataset.SOPInstanceUID), _encode(dataset))
    report = pipeline.ingest_batch("site1", batch)
    assert report.stored + report.quarantined == 1, report
    if report.quarantined:
        assert list((pipeline.quarantine_root / "site1" / batch).glob("*.reason.json"))
        return
    [study] = report.stored_study_uids
    [key] = pipeline.index.instance_keys(study)
    assert isinstance(pipeline.store, FilesystemObjectStore)
    stored = (pipeline.store.root / key).read_bytes()
    assert MARKER.encode() not in stored, "an identifying value survived de-identification"
    for uid in _original_uids(dataset):
        assert uid.encode() not in stored, "an original UID survived"
    assert pydicom.dcmread(io.BytesIO(stored)).SOPInstanceUID != dataset.SOPInstanceUID


def _nested(levels: int, keyword: str) -> Dataset:
    """`levels` items deep through sequences the profile keeps, `keyword` = MARKER at each."""
    inner = Dataset()
    for level in range(levels):
        outer = Dataset()
        outer.CodeValue = f"C{level}"
        setattr(outer, keyword, f"{MARKER} level {level}")
        outer[("AnatomicRegionSequence", "ProcedureCodeSequence")[level % 2]] = \
            pydicom.DataElement(("AnatomicRegionSequence", "ProcedureCodeSequence")[level % 2], "SQ",
                                Sequence([inner]))
        inner = outer
    return inner


@pytest.mark.parametrize(("keyword", "kept"), [("InstitutionName", False), ("CodeMeaning", True)])
def test_a_deeply_nested_data_set_is_cleaned_at_every_level(pipeline: IngestPipeline, keyword: str,
                                                            kept: bool) -> None:
    """Twelve levels of kept sequences: an identifying attribute is removed at every level,
    while a kept one (Code Meaning) stays at every level (the walk reaches the bottom)."""
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    dataset.DerivationCodeSequence = Sequence([_nested(12, keyword)])
    number = next(_CASES)
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.999.{number}.3"
    dataset.StudyInstanceUID = f"1.2.826.0.1.3680043.10.999.{number}.1"
    dataset.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.999.{number}.2"  # a series is in one study
    Spool(pipeline.spool_root, "site1").write(f"deep-{number}", str(dataset.SOPInstanceUID), _encode(dataset))
    report = pipeline.ingest_batch("site1", f"deep-{number}")
    assert report.stored == 1
    [study] = report.stored_study_uids
    [key] = pipeline.index.instance_keys(study)
    assert isinstance(pipeline.store, FilesystemObjectStore)
    stored = (pipeline.store.root / key).read_bytes()
    assert stored.count(MARKER.encode()) == (12 if kept else 0)
    assert stored.count(b"C11") == 1  # the sequences themselves are all there


def _nested_beyond_recursion(levels: int = 5000) -> bytes:
    """CT_small with `levels` nested sequences of undefined length, written byte by byte
    (pydicom itself cannot write so deep a data set): what a hostile sender could send."""
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.999.9"
    data = _encode(dataset)

    def tag(group: int, element: int) -> bytes:
        return struct.pack("<HH", group, element)

    opening = tag(0x0008, 0x2218) + b"SQ\0\0\xff\xff\xff\xff" + tag(0xFFFE, 0xE000) + b"\xff\xff\xff\xff"
    closing = tag(0xFFFE, 0xE00D) + b"\0\0\0\0" + tag(0xFFFE, 0xE0DD) + b"\0\0\0\0"
    position = data.index(tag(0x0010, 0x0010))
    return data[:position] + opening * levels + closing * levels + data[position:]


def test_nesting_beyond_the_recursion_limit_is_refused_by_the_node(node: DicomNode,
                                                                   tmp_path: Path) -> None:
    path = tmp_path / "deep.dcm"
    path.write_bytes(_nested_beyond_recursion())
    before = set(node.spool.site_dir.glob("*/*.dcm"))
    assert int(store_bytes_as_they_are(node, path).Status) == StoreStatus.CANNOT_UNDERSTAND
    assert set(node.spool.site_dir.glob("*/*.dcm")) == before


def test_nesting_beyond_the_recursion_limit_is_quarantined_by_the_worker(pipeline: IngestPipeline) -> None:
    Spool(pipeline.spool_root, "site1").write("too-deep", "1.2.826.0.1.3680043.10.999.9",
                                              _nested_beyond_recursion())
    report = pipeline.ingest_batch("site1", "too-deep")
    assert (report.stored, report.quarantined) == (0, 1)
    [reason] = (pipeline.quarantine_root / "site1" / "too-deep").glob("*.reason.json")
    assert "RecursionError" in reason.read_text()
