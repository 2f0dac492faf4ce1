"""`dicom-gateway import PATH…`: files and zip archives through the same ingest pipeline."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from gateway.settings import SettingsError
from imaging import UNREADABLE_DATASET_ERRORS
from spool import PendingRecord, ProcessMark, Spool, private_directory
from spool.claims import write_reserved
from worker import IngestPipeline

#: Largest file an import reads (a zip member is read as it inflates and dropped past it: a
#: member of a few kilobytes can inflate to gigabytes). The STOW-RS default request limit.
MAX_FILE_BYTES = 2 * 1024**3
_CHUNK = 1 << 20


@dataclass
class ImportSummary:
    files: int = 0
    bytes: int = 0
    stored: int = 0
    duplicates: int = 0
    not_dicom: int = 0
    #: Files and zip members larger than the limit (not read past it).
    too_large: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class _Source:
    name: str
    size: int
    path: Path
    member: str | None = None

    def read(self, limit: int) -> bytes | None:
        """The file's bytes, or None when there are more than `limit` (a zip member is
        inflated 1 MiB at a time and never past the limit, whatever size it declares)."""
        if self.size > limit:
            return None
        if self.member is None:
            body = self.path.read_bytes()
            return body if len(body) <= limit else None
        inflated = bytearray()
        try:
            with zipfile.ZipFile(self.path) as archive, archive.open(self.member) as member:
                while chunk := member.read(_CHUNK):
                    inflated += chunk
                    if len(inflated) > limit:
                        return None
        except (zipfile.BadZipFile, zlib.error, EOFError):
            return b""  # a damaged member (bad CRC, cut short) is no DICOM file; go on
        return bytes(inflated)


def _walk(paths: list[Path]) -> Iterator[_Source]:
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as archive:
                    for info in archive.infolist():
                        if not info.is_dir():
                            yield _Source(
                                f"{path}:{info.filename}", info.file_size, path, info.filename
                            )
            else:
                yield _Source(str(path), path.stat().st_size, path)


def _is_dicom(body: bytes) -> bool:
    return len(body) > 132 and body[128:132] == b"DICM"


def run_import(
    paths: list[Path],
    pipeline: IngestPipeline,
    spool: Spool,
    console: Console | None = None,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> ImportSummary:
    """Spool every DICOM file per study, run the pipeline on each batch, return counts.
    Files and zip members above `max_file_bytes` are counted as too large and skipped."""
    sources = list(_walk(paths))
    # While this process lives its batches are its own; were it to die, the workers'
    # recovery loop would see its mark free and process them.
    mark = ProcessMark(spool.root, "import")
    try:
        return _import(sources, pipeline, spool, console, max_file_bytes, mark)
    finally:
        mark.close()


def _import(
    sources: list[_Source],
    pipeline: IngestPipeline,
    spool: Spool,
    console: Console | None,
    max_file_bytes: int,
    mark: ProcessMark,
) -> ImportSummary:
    summary = ImportSummary()
    run_tag = f"import-{uuid.uuid4().hex[:12]}"
    batches: set[str] = set()
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        reading = progress.add_task("reading", total=sum(s.size for s in sources))
        for source in sources:
            body = source.read(max_file_bytes)
            summary.files += 1
            if body is None:
                summary.too_large += 1
                progress.advance(reading, source.size)
                continue
            summary.bytes += len(body)
            progress.advance(reading, len(body))
            if not _is_dicom(body):
                summary.not_dicom += 1
                continue
            try:
                header = pydicom.dcmread(BytesIO(body), stop_before_pixels=True)
                study = str(header.StudyInstanceUID)
                sop = str(header.SOPInstanceUID)
            except UNREADABLE_DATASET_ERRORS:
                sop = hashlib.sha256(body).hexdigest()[:20]  # the pipeline quarantines it
                study = "unreadable"
            if pipeline.policy.keys is None:  # the region's pipeline: no identified imports
                raise SettingsError(
                    "the import de-identifies: it runs at a site, with the pseudonymization secret"
                )
            deidentified = pipeline.policy.keys.uid(sop)
            if pipeline.index.find_instance(deidentified) is not None:
                summary.duplicates += 1
                continue
            batch = spool.batch_id(run_tag, study)
            name = sop if sop.replace(".", "").isdigit() else "1." + str(int(sop, 16))
            if batch not in batches:  # this process processes it: the workers leave it alone
                write_reserved(
                    private_directory(spool.site_dir / batch),
                    PendingRecord("reserved", time.time(), by=mark.name),
                )
            spool.write(batch, name, body)
            batches.add(batch)
        storing = progress.add_task("storing", total=len(batches))
        for batch in sorted(batches):
            report = pipeline.ingest_batch(spool.site_id, batch)
            summary.stored += report.stored
            progress.advance(storing)
    quarantine = pipeline.quarantine_root / spool.site_id
    for batch in batches:
        for reason_file in (quarantine / batch).glob("*.reason.json"):
            summary.quarantined[json.loads(reason_file.read_text())["reason"]] += 1
    return summary


def file_count(paths: list[Path]) -> int:
    return sum(1 for _ in _walk(paths))


__all__ = ["MAX_FILE_BYTES", "ImportSummary", "file_count", "run_import"]
