"""The share's ZIP as a DICOM File-set (PS3.10, the layout of a CD or USB stick): the
instances under File IDs of uppercase components of at most 8 characters, and a DICOMDIR
(PS3.3 F.2) that indexes them — what viewers, PACS importers and burning tools open.

The ZIP is streamed, so each instance is read once: its directory records are made as it
goes into the ZIP, under the File ID it is given then, and the DICOMDIR is written last.

The records' contents are pydicom's (`DIRECTORY_RECORDERS`, the record type pydicom gives
the SOP class). pydicom's `FileSet` is not used to hold them: it compares each added
instance with every other, and costs 20 s for a 3,000-image series (measured), where this
costs milliseconds. What is left to write here is the Directory Record Sequence's
links: records in depth-first order, each with the byte offset of its next sibling and of
its first child (PS3.3 F.3.2.2), computed from the encoded length of each record, which the
offsets (fixed 4-byte values) do not change.

A record needs Type 1 attributes that de-identification empties or that a source omitted
(Study ID, Study Date/Time, Series and Instance Numbers, an SR's flags and content date).
As dcmtk's `dcmmkdir +I` does, the record then gets an invented value (a number in order,
a date of 19000101...); the instance itself is never changed. An instance whose leaf record
still cannot be made is indexed under a PRIVATE record in its series, so no file of the
ZIP is outside the DICOMDIR.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.fileset import DIRECTORY_RECORDERS
from pydicom.fileset import _four_level_record_type as leaf_record_type  # the type pydicom gives
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, MediaStorageDirectoryStorage, generate_uid

#: Type 1 values of directory records (PS3.3 F.5) invented when the instance lacks them.
_TEXT_DEFAULTS: dict[str, Callable[[Dataset], str]] = {
    "PatientID": lambda ds: "ANONYMOUS",
    "Modality": lambda ds: "OT",
    "StudyDate": lambda ds: str(ds.get("SeriesDate") or ds.get("ContentDate") or "19000101"),
    "StudyTime": lambda ds: "000000",
    "ContentDate": lambda ds: str(ds.get("StudyDate") or "19000101"),
    "ContentTime": lambda ds: str(ds.get("StudyTime") or "000000"),
    "CompletionFlag": lambda ds: "PARTIAL",
    "VerificationFlag": lambda ds: "UNVERIFIED",
}
_LEVELS = (
    ("PATIENT", "PT", "PatientID"),
    ("STUDY", "ST", "StudyInstanceUID"),
    ("SERIES", "SE", "SeriesInstanceUID"),
)
_ITEM, _SEQUENCE_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
#: (0004,1220) Directory Record Sequence, explicit VR little endian, undefined length.
_RECORD_SEQUENCE = b"\x04\x00\x20\x12SQ\x00\x00\xff\xff\xff\xff"


def _empty(dataset: Dataset, keyword: str) -> bool:
    return keyword not in dataset or dataset[keyword].VM == 0


def _encoded(dataset: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, dataset)
    return buffer.getvalue()


@dataclass
class _Node:
    record: Dataset
    #: Its place among its parent's children: its File ID component.
    number: int = 0
    children: list[_Node] = field(default_factory=list)
    by_key: dict[str, _Node] = field(default_factory=dict)
    offset: int = 0

    def walk(self) -> Iterator[_Node]:
        for child in self.children:
            yield child
            yield from child.walk()


class MediaFileSet:
    """Instances added one by one (each gets its File ID), then the DICOMDIR."""

    def __init__(self) -> None:
        self._root = _Node(Dataset())
        self._ids: set[str] = set()
        #: Numbers given so far in each scope (studies; a study's series; a series' instances).
        self._counts: dict[tuple[str, ...], int] = {}
        #: The number invented for each study and series, the same for all its instances.
        self._invented: dict[tuple[str, ...], int] = {}

    def _next(self, *scope: str) -> int:
        self._counts[scope] = self._counts.get(scope, 0) + 1
        return self._counts[scope]

    def _number_of(self, *key: str) -> int:
        """The invented number of a study (key: its UID) or of a series of a study (key:
        both UIDs), numbered within its parent."""
        if key not in self._invented:
            self._invented[key] = self._next(*key[:-1])
        return self._invented[key]

    def _completed(self, header: Dataset) -> Dataset:
        """The header with invented Type 1 values its directory records need."""
        study = str(header.get("StudyInstanceUID", ""))
        series = str(header.get("SeriesInstanceUID", ""))
        for keyword, default in _TEXT_DEFAULTS.items():
            if _empty(header, keyword):
                setattr(header, keyword, default(header))
        if _empty(header, "StudyID"):
            header.StudyID = str(self._number_of(study))
        if _empty(header, "SeriesNumber"):
            header.SeriesNumber = self._number_of(study, series)
        if _empty(header, "InstanceNumber"):
            header.InstanceNumber = self._next(study, series)
        return header

    @staticmethod
    def _record(record_type: str, header: Dataset) -> Dataset:
        try:
            record = DIRECTORY_RECORDERS[record_type](header)
        except (KeyError, ValueError):  # a leaf the defaults cannot complete
            record_type, record = "PRIVATE", Dataset()
            record.PrivateRecordUID = generate_uid()
        record.OffsetOfTheNextDirectoryRecord = 0
        record.RecordInUseFlag = 0xFFFF
        record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
        record.DirectoryRecordType = record_type
        if "SpecificCharacterSet" in header:
            record.SpecificCharacterSet = header.SpecificCharacterSet
        return record

    def add(self, body: bytes) -> str | None:
        """Record the instance; its File ID (`/`-separated), or None when it is not a DICOM
        instance or is already in the File-set."""
        try:
            header = pydicom.dcmread(BytesIO(body), stop_before_pixels=True)
        except (InvalidDicomError, ValueError, EOFError, KeyError):
            return None
        sop = str(header.get("SOPInstanceUID", "") or "")
        meta = getattr(header, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        if not sop or sop in self._ids or syntax is None:
            return None
        self._ids.add(sop)
        completed = self._completed(header)
        parent, components = self._root, []
        for record_type, prefix, keyword in _LEVELS:
            key = str(completed.get(keyword, ""))
            node = parent.by_key.get(key)
            if node is None:
                node = parent.by_key[key] = _Node(
                    self._record(record_type, completed), len(parent.children)
                )
                parent.children.append(node)
            components.append(f"{prefix}{node.number:06d}")
            parent = node
        leaf = self._record(leaf_record_type(completed), completed)
        components.append(f"IM{len(parent.children):06d}")
        leaf.ReferencedFileID = components
        leaf.ReferencedSOPClassUIDInFile = completed.SOPClassUID
        leaf.ReferencedSOPInstanceUIDInFile = sop
        leaf.ReferencedTransferSyntaxUIDInFile = syntax
        parent.children.append(_Node(leaf))
        return "/".join(components)

    def dicomdir(self) -> bytes:
        """The DICOMDIR of everything added."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        top = Dataset()
        top.FileSetID = "DICOM_GATEWAY"
        top.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
        top.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
        top.FileSetConsistencyFlag = 0
        nodes = list(self._root.walk())
        # Offsets are counted from the file's first byte (preamble included).
        position = len(self._prefix(meta, top)) + len(_RECORD_SEQUENCE)
        for node in nodes:
            node.offset = position
            position += 8 + len(_encoded(node.record))
        for node in [self._root, *nodes]:
            for before, after in zip(node.children, node.children[1:], strict=False):
                before.record.OffsetOfTheNextDirectoryRecord = after.offset
            if node is not self._root and node.children:
                node.record.OffsetOfReferencedLowerLevelDirectoryEntity = node.children[0].offset
        if self._root.children:
            top.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = self._root.children[
                0
            ].offset
            top.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = self._root.children[
                -1
            ].offset
        items = []
        for node in nodes:
            encoded = _encoded(node.record)
            items.append(_ITEM + struct.pack("<I", len(encoded)) + encoded)
        return self._prefix(meta, top) + _RECORD_SEQUENCE + b"".join(items) + _SEQUENCE_END

    @staticmethod
    def _prefix(meta: FileMetaDataset, top: Dataset) -> bytes:
        """Preamble, prefix, file meta and the elements before the record sequence."""
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        buffer.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(buffer, meta, enforce_standard=True)
        write_dataset(buffer, top)
        return buffer.getvalue()
