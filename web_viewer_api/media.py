"""The share's ZIP as a DICOM File-set (PS3.10, the layout of a CD or USB stick): the
instances under File IDs of uppercase components of at most 8 characters, and a DICOMDIR
that indexes them — what viewers, PACS importers and burning tools open.

pydicom's `FileSet` builds the directory and names the files; the ZIP is streamed, so each
instance is read once: its header is staged as it goes into the ZIP, under the File ID the
File-set gives it, and the DICOMDIR is written last.

A directory record needs Type 1 attributes that de-identification empties or that a
source omitted (Study ID, Study Date/Time, Series and Instance Numbers, an SR's flags and
content date). As dcmtk's `dcmmkdir +I` does, the record then gets an invented value (a
number in order, a date of 19000101...); the instance itself is never changed. An instance
whose records still cannot be made is indexed under a PRIVATE record below its series,
so no file of the ZIP is outside the DICOMDIR.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.fileset import DIRECTORY_RECORDERS, FileSet, RecordNode

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


def _empty(dataset: Dataset, keyword: str) -> bool:
    return keyword not in dataset or dataset[keyword].VM == 0


class MediaFileSet:
    """Instances added one by one (each gets its File ID), then the DICOMDIR."""

    def __init__(self) -> None:
        self._staging = tempfile.TemporaryDirectory(prefix="dgw-fileset-")
        self._fileset = FileSet()
        self._fileset.ID = "DICOM_GATEWAY"
        self._ids: set[str] = set()
        self._numbers: dict[tuple[str, ...], int] = {}

    def close(self) -> None:
        self._staging.cleanup()

    def _next(self, *scope: str) -> int:
        self._numbers[scope] = self._numbers.get(scope, 0) + 1
        return self._numbers[scope]

    def _completed(self, header: Dataset) -> Dataset:
        """The header with invented Type 1 values its directory records need."""
        study = str(header.get("StudyInstanceUID", ""))
        series = str(header.get("SeriesInstanceUID", ""))
        for keyword, default in _TEXT_DEFAULTS.items():
            if _empty(header, keyword):
                setattr(header, keyword, default(header))
        if _empty(header, "StudyID"):
            header.StudyID = str(self._number_of("study", study))
        if _empty(header, "SeriesNumber"):
            header.SeriesNumber = self._number_of("series", study, series)
        if _empty(header, "InstanceNumber"):
            header.InstanceNumber = self._next("instance", series)
        return header

    def _number_of(self, kind: str, *key: str) -> int:
        """One invented number per study (per series of a study), the same for each of its
        instances."""
        known = self._numbers.get((kind, "=", *key))
        if known is None:
            known = self._numbers[(kind, "=", *key)] = self._next(kind, *key[:-1])
        return known

    def add(self, body: bytes) -> str | None:
        """Stage the instance; its File ID (`/`-separated), or None when it is not a DICOM
        instance or is already in the File-set."""
        try:
            header = pydicom.dcmread(BytesIO(body), stop_before_pixels=True)
        except (InvalidDicomError, ValueError, EOFError, KeyError):
            return None
        sop = str(header.get("SOPInstanceUID", "") or "")
        if not sop or sop in self._ids or "TransferSyntaxUID" not in header.file_meta:
            return None
        self._ids.add(sop)
        completed = self._completed(header)
        try:
            instance = self._fileset.add(completed)
        except ValueError:  # records the defaults cannot complete
            instance = self._fileset.add_custom(completed, self._private_leaf(completed))
        return instance.FileID.replace("\\", "/")

    @staticmethod
    def _private_leaf(header: Dataset) -> RecordNode:
        nodes = []
        for record_type in ("PATIENT", "STUDY", "SERIES"):
            record = DIRECTORY_RECORDERS[record_type](header)
            record.DirectoryRecordType = record_type
            nodes.append(RecordNode(record))
        nodes[1].parent, nodes[2].parent = nodes[0], nodes[1]
        parent = nodes[2]
        leaf_record = Dataset()
        leaf_record.DirectoryRecordType = "PRIVATE"
        leaf_record.PrivateRecordUID = pydicom.uid.generate_uid()
        leaf = RecordNode(leaf_record)
        leaf.parent = parent
        return leaf

    def dicomdir(self) -> bytes:
        """The DICOMDIR of everything added (written with the staged headers in a private
        temporary folder, of which only the DICOMDIR is read)."""
        root = Path(self._staging.name) / "fileset"
        self._fileset.write(root)
        return (root / "DICOMDIR").read_bytes()
