"""The ingest pipeline: spool batch -> de-identify -> object store -> index -> delete spool.

Plain functions and one class; the Celery task only calls `IngestPipeline.ingest_batch`.
Output keys and UIDs are deterministic, so running a batch twice overwrites, never duplicates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from sqlalchemy.exc import SQLAlchemyError

from anonymize import DeidentificationError, DeidentificationPolicy, deidentify
from storage import IndexRepository, InstanceRecord, ObjectStore, StorageError, instance_key
from worker.completion import instance_metadata_key
from worker.dataset_errors import UNREADABLE_DATASET_ERRORS
from worker.spool import PRIVATE_FILE_MODE, open_private, private_directory
from worker.transcode import Codec, TranscodeStatus, transcode_lossless

log = logging.getLogger(__name__)
#: What sends an instance to quarantine instead of the archive (never a retried poison task).
_QUARANTINE: tuple[type[Exception], ...] = (DeidentificationError, *UNREADABLE_DATASET_ERRORS)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._\-]+$")
SPOOL_SUFFIX = ".dcm"
#: Our own private block in stored objects: what reindex needs and the object cannot say.
PRIVATE_GROUP = 0x0077
PRIVATE_CREATOR = "DICOM-GATEWAY 1"
_SITE_ELEMENT, _SOURCE_SYNTAX_ELEMENT, _COMPRESSION_ELEMENT = 0x10, 0x11, 0x12
_BULK_THRESHOLD = 1024


class PipelineError(Exception):
    """Base of the worker's own errors."""


class TransientPipelineError(PipelineError):
    """A dependency (object store, index) failed; the whole batch is retried later."""


class InvalidBatchName(PipelineError, ValueError):
    """A site or batch identifier that is not a plain directory name."""


@dataclass
class IngestReport:
    """What one batch run did (counts only: no identifier leaves the site in a log)."""

    site_id: str
    batch_id: str
    stored: int = 0
    quarantined: int = 0
    missing: bool = False
    stored_study_uids: set[str] = field(default_factory=set)
    seconds: float = 0.0


def _checked_name(value: str, what: str) -> str:
    if not _SAFE_NAME.match(value) or value in (".", ".."):
        raise InvalidBatchName(f"invalid {what} name")
    return value


def stamp_provenance(dataset: Dataset, site_id: str, source_syntax: str, compression: str) -> None:
    """Record the producing site, the received transfer syntax and the compression outcome."""
    block = dataset.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(_SITE_ELEMENT, "LO", site_id)
    block.add_new(_SOURCE_SYNTAX_ELEMENT, "UI", source_syntax)
    block.add_new(_COMPRESSION_ELEMENT, "LO", compression)


def read_provenance(dataset: Dataset) -> tuple[str, str, str]:
    """(site, source transfer syntax, compression) stamped by `stamp_provenance`."""
    try:
        block = dataset.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    except KeyError:
        return "", "", ""
    values = []
    for element in (_SITE_ELEMENT, _SOURCE_SYNTAX_ELEMENT, _COMPRESSION_ELEMENT):
        values.append(str(block[element].value) if element in block else "")
    return values[0], values[1], values[2]


def instance_json(dataset: Dataset, study: str, series: str, sop: str) -> bytes:
    """DICOM JSON of an instance; bulk data replaced by BulkDataURIs relative to the root."""
    base = f"studies/{study}/series/{series}/instances/{sop}/bulkdata"

    def bulk_uri(element: DataElement) -> str:
        return f"{base}/{int(element.tag):08X}"

    document = dataset.to_json_dict(bulk_data_threshold=_BULK_THRESHOLD,
                                    bulk_data_element_handler=bulk_uri)
    return json.dumps(document).encode()


def encode_dataset(dataset: Dataset) -> bytes:
    """Serialise a dataset as a DICOM Part 10 file."""
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def record_for(dataset: Dataset, key: str, body: bytes) -> InstanceRecord:
    """The index record of a stored object (used at ingest and by reindex)."""
    site_id, source_syntax, compression = read_provenance(dataset)
    return InstanceRecord.from_dataset(
        dataset,
        object_key=key,
        size_bytes=len(body),
        sha256=hashlib.sha256(body).hexdigest(),
        transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID),
        site_id=site_id,
        source_transfer_syntax_uid=source_syntax,
        compression=compression,
    )


@dataclass
class IngestPipeline:
    """Dependencies of the ingest path, passed in by the composition root."""

    store: ObjectStore
    index: IndexRepository
    policy: DeidentificationPolicy
    spool_root: Path
    quarantine_root: Path
    codec: Codec | None = Codec.JPEG_LS

    def batch_dir(self, site_id: str, batch_id: str) -> Path:
        return self.spool_root / _checked_name(site_id, "site") / _checked_name(batch_id, "batch")

    def ingest_batch(self, site_id: str, batch_id: str) -> IngestReport:
        """Process every spooled instance of a batch; raise TransientPipelineError to retry."""
        started = time.perf_counter()
        report = IngestReport(site_id, batch_id)
        directory = self.batch_dir(site_id, batch_id)
        if not directory.is_dir():
            report.missing = True  # already processed by an earlier delivery of this task
            return report
        records: list[InstanceRecord] = []
        done: list[Path] = []
        for path in sorted(directory.glob(f"*{SPOOL_SUFFIX}")):
            try:
                record = self._process_file(path, site_id)
            except FileNotFoundError:
                continue  # a concurrent delivery of the same batch finished this file
            except (StorageError, SQLAlchemyError) as exc:
                raise TransientPipelineError(f"{type(exc).__name__}: {exc}") from exc
            except _QUARANTINE as exc:
                self._quarantine(path, site_id, batch_id, exc)
                report.quarantined += 1
                continue
            records.append(record)
            done.append(path)
        try:
            self.index.upsert_instances(records)
        except SQLAlchemyError as exc:
            raise TransientPipelineError(f"index unavailable: {type(exc).__name__}") from exc
        for path in done:  # the spool is deleted last: a crash before here only repeats work
            path.unlink(missing_ok=True)
        self._remove_if_empty(directory)
        report.stored = len(records)
        report.stored_study_uids = {str(r.study["study_instance_uid"]) for r in records}
        report.seconds = time.perf_counter() - started
        log.info(
            "batch %s/%s: %d stored, %d quarantined in %.3fs",
            site_id, batch_id, report.stored, report.quarantined, report.seconds,
        )
        return report

    def _process_file(self, path: Path, site_id: str) -> InstanceRecord:
        dataset = pydicom.dcmread(path)
        source_syntax = str(dataset.file_meta.TransferSyntaxUID)
        # The batch's site qualifies local identifiers: two hospitals' "12345" differ.
        policy = (self.policy if site_id == self.policy.site_id
                  else dataclasses.replace(self.policy, site_id=site_id))
        deidentify(dataset, policy)
        compression = "none"
        if self.codec is not None:
            outcome = transcode_lossless(dataset, self.codec)
            compression = (self.codec.value if outcome.status is TranscodeStatus.COMPRESSED
                           else outcome.status.value)
            if outcome.status is TranscodeStatus.VERIFICATION_FAILED:
                log.error("lossless verification failed; original syntax stored (%s)",
                          outcome.reason)
        stamp_provenance(dataset, site_id, source_syntax, compression)
        body = encode_dataset(dataset)
        study, series, sop = (str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID),
                              str(dataset.SOPInstanceUID))
        key = instance_key(study, series, sop)
        self.store.put(key, body)
        self.store.put(instance_metadata_key(study, series, sop),
                       instance_json(dataset, study, series, sop),
                       content_type="application/dicom+json")
        return record_for(dataset, key, body)

    def _quarantine(self, path: Path, site_id: str, batch_id: str, exc: Exception) -> None:
        # Identified data, like the spool it comes from: folders 0700, files 0600.
        target_dir = private_directory(self.quarantine_root / site_id / batch_id)
        target = target_dir / path.name
        reason = {
            "reason": type(exc).__name__,
            "detail": str(exc)[:2000],
            "quarantined_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "site_id": site_id,
            "batch_id": batch_id,
        }
        reason_path = target.with_name(target.name + ".reason.json")
        with open_private(reason_path, exclusive=False) as handle:
            handle.write(json.dumps(reason, indent=2).encode())
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return
        except OSError:
            shutil.move(str(path), str(target))  # another file system: copied with its mode
            os.chmod(target, PRIVATE_FILE_MODE)
        log.warning("batch %s/%s: one instance quarantined (%s)", site_id, batch_id, type(exc).__name__)

    @staticmethod
    def _remove_if_empty(directory: Path) -> None:
        try:
            for leftover in directory.iterdir():
                # node marker files go; a ".part" is a write in progress: keep the batch
                if leftover.name.startswith(".") and not leftover.name.endswith(".part"):
                    leftover.unlink(missing_ok=True)
            directory.rmdir()
        except OSError:
            pass  # not empty: new instances arrived or quarantine failed; the sweeper retries
