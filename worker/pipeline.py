"""The ingest pipeline: spool batch -> de-identify -> object store -> index -> delete spool.

Plain functions and one class; the Celery task only calls `IngestPipeline.ingest_batch`.
Output keys and UIDs are deterministic, so running a batch twice finds its own objects, never
duplicates. Instance objects are written once (`ObjectStore.create`): a different instance
under stored UIDs is a conflict, quarantined and audited, and the stored one stays.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from sqlalchemy.exc import SQLAlchemyError

from anonymize import (
    BurnedInAnnotationRisk,
    DeidentificationError,
    DeidentificationPolicy,
    DomainIdentity,
    ProfileOption,
    PseudonymKeys,
    deidentify,
)
from imaging import (
    DEFAULT_DECODE_LIMITS,
    UNREADABLE_DATASET_ERRORS,
    Codec,
    DecodeLimitExceeded,
    DecodeLimits,
    StoreStatus,
    TranscodeStatus,
    encode_dataset,
    read_bounded,
    text_of,
    transcode_lossless,
)
from imaging.dicom_model import dataset_document, instance_document, json_bytes
from spool import (
    PRIVATE_FILE_MODE,
    SPOOL_SUFFIX,
    BatchClaim,
    BatchReply,
    InstanceOutcome,
    open_private,
    private_directory,
    record_retry,
    record_started,
    reply_requested,
    write_reply,
)
from storage import (
    WORKER_ACTIONS,
    AlreadyExists,
    AuditEntry,
    IndexRepository,
    InstanceRecord,
    ObjectNotFound,
    ObjectStore,
    Ownership,
    StorageError,
    WithheldRecord,
    instance_key,
    instance_metadata_key,
    study_owner_key,
)

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._\-]+$")
#: Our own private block in stored objects: what reindex needs and the object cannot say.
PRIVATE_GROUP = 0x0077
PRIVATE_CREATOR = "DICOM-GATEWAY 1"
_SITE_ELEMENT, _SOURCE_SYNTAX_ELEMENT, _COMPRESSION_ELEMENT = 0x10, 0x11, 0x12
#: The pseudonym of the patient's local ID beside the INS (never the original): the index
#: keeps it for lookups by that ID, reindex restores it from here.
_LOCAL_PATIENT_ELEMENT = 0x13


class PipelineError(Exception):
    """Base of the worker's own errors."""


class TransientPipelineError(PipelineError):
    """A dependency (object store, index) failed; the whole batch is retried later."""

    @property
    def reason(self) -> str:
        """What failed, as a type name (the message may quote a key: not recorded)."""
        cause = self.__cause__
        return type(cause).__name__ if cause is not None else "TransientPipelineError"


class InvalidBatchName(PipelineError, ValueError):
    """A site or batch identifier that is not a plain directory name."""


class NotOfTheDomain(DeidentificationError):
    """The region's pipeline (no pseudonymization secret) met an object that is not of the
    domain: it cannot de-identify it, and takes only write-backs into stored studies."""


class InstanceConflict(PipelineError):
    """What a writer sent contradicts what the domain holds (another instance under stored
    UIDs, another patient's study, another study's series): the stored data stays, this
    instance is quarantined and a Security Alert audited. Its message names de-identified
    UIDs only."""

    def __init__(
        self,
        reason: str,
        *,
        study_instance_uid: str,
        sop_instance_uid: str,
        received_sha256: str = "",
        stored_sha256: str = "",
        failure_reason: int = StoreStatus.NOT_AUTHORIZED,
    ) -> None:
        super().__init__(f"{reason} (SOP Instance {sop_instance_uid})")
        self.reason = reason
        #: For a waiting writer (PS3.4): 0124 refused, 0111 another instance under its UIDs.
        self.failure_reason = failure_reason
        self.study_instance_uid = study_instance_uid
        self.sop_instance_uid = sop_instance_uid
        self.received_sha256 = received_sha256
        self.stored_sha256 = stored_sha256


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
    #: Each instance's outcome by spool file name (UIDs as sent: never logged).
    outcomes: dict[str, InstanceOutcome] = field(default_factory=dict, repr=False)


def _checked_name(value: str, what: str) -> str:
    if not _SAFE_NAME.match(value) or value in (".", ".."):
        raise InvalidBatchName(f"invalid {what} name")
    return value


def stamp_provenance(
    dataset: Dataset, site_id: str, source_syntax: str, compression: str, local_patient_id: str = ""
) -> None:
    """Record the producing site (when given), the received transfer syntax, the
    compression outcome and the local-ID pseudonym beside the INS (when there is one)."""
    block = dataset.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    if site_id:  # named only under Retain Institution Identity (the index knows it anyway)
        block.add_new(_SITE_ELEMENT, "LO", site_id)
    block.add_new(_SOURCE_SYNTAX_ELEMENT, "UI", source_syntax)
    block.add_new(_COMPRESSION_ELEMENT, "LO", compression)
    if local_patient_id:
        block.add_new(_LOCAL_PATIENT_ELEMENT, "LO", local_patient_id)


def read_local_patient_id(dataset: Dataset) -> str:
    """The local-ID pseudonym `stamp_provenance` recorded, or ""."""
    try:
        block = dataset.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    except KeyError:
        return ""
    return str(block[_LOCAL_PATIENT_ELEMENT].value) if _LOCAL_PATIENT_ELEMENT in block else ""


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
    """The stored DICOM JSON of an instance (`imaging.dicom_model.instance_document`)."""
    return json_bytes(instance_document(dataset, study, series, sop))


def record_for(
    dataset: Dataset,
    key: str,
    body: bytes,
    *,
    site_id: str | None = None,
    study_site_id: str | None = None,
) -> InstanceRecord:
    """The index record of a stored object (used at ingest and by reindex): stored by
    `site_id` (default: the site its provenance names) in a study owned by `study_site_id`
    (default: the same)."""
    stamped_site, source_syntax, compression = read_provenance(dataset)
    return InstanceRecord.from_dataset(
        dataset,
        object_key=key,
        size_bytes=len(body),
        sha256=hashlib.sha256(body).hexdigest(),
        transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID),
        site_id=stamped_site if site_id is None else site_id,
        source_transfer_syntax_uid=source_syntax,
        compression=compression,
        study_site_id=study_site_id,
        local_patient_id=read_local_patient_id(dataset),
    )


#: What sends an instance to quarantine instead of the archive (never a retried poison task).
_QUARANTINE: tuple[type[Exception], ...] = (
    DeidentificationError,
    InstanceConflict,
    DecodeLimitExceeded,
    *UNREADABLE_DATASET_ERRORS,
)
#: What `ingest_batch` settles per instance: a retry of the batch, or a quarantine.
_SETTLED: tuple[type[Exception], ...] = (StorageError, SQLAlchemyError, *_QUARANTINE)
#: Encrypted Attributes Sequence: a new random key at each encryption.
_ENCRYPTED_ATTRIBUTES, _PIXEL_DATA = 0x04000500, 0x7FE00010


@dataclass(frozen=True)
class StudyOwner:
    """Who owns a study: the site that stored it first, and its patient pseudonym. Kept as
    `studies/<uid>/owner.json`, written once (`ObjectStore.create`): of two sites storing
    one study at once, one owns it, for good."""

    site_id: str
    patient_id: str

    def to_bytes(self) -> bytes:
        return json.dumps({"site_id": self.site_id, "patient_id": self.patient_id}).encode()

    @classmethod
    def from_bytes(cls, body: bytes) -> StudyOwner:
        document = json.loads(body)
        return cls(str(document["site_id"]), str(document["patient_id"]))


def read_study_owner(store: ObjectStore, study_instance_uid: str) -> StudyOwner | None:
    """The recorded owner of a study, or None (stored before owners were recorded)."""
    try:
        return StudyOwner.from_bytes(store.get(study_owner_key(study_instance_uid)))
    except ObjectNotFound:
        return None


def claim_study(store: ObjectStore, study_instance_uid: str, claim: StudyOwner) -> StudyOwner:
    """The study's owner: `claim` if no site owned it yet, else the recorded one."""
    try:
        store.create(
            study_owner_key(study_instance_uid), claim.to_bytes(), content_type="application/json"
        )
        return claim
    except AlreadyExists:
        owner = read_study_owner(store, study_instance_uid)
        if owner is None:  # cannot happen: create found it; a store that lost it is broken
            raise StorageError("study owner vanished after a conflicting create") from None
        return owner


#: What de-identification derives from keys another site qualifies differently when the
#: patient or the accession has no issuer: the pseudonyms, and the dates it shifts.
_SITE_QUALIFIED = frozenset(
    {0x00100010, 0x00100020, 0x00100021, 0x00101002, 0x00080050, 0x00080051}
)
_SHIFTED_VRS = frozenset({"DA", "DT", "TM"})


def _content_digest(dataset: Dataset, *, across_sites: bool, ignore_private: bool = False) -> str:
    """SHA-256 of an instance's attributes but pixel data and those two stores of it may
    differ in (our provenance block, encrypted attributes; `across_sites`: the pseudonyms
    and shifted dates of `_SITE_QUALIFIED`; `ignore_private`: every private attribute, which
    a PACS sending a stored instance back may add); bulk values by their hash."""

    def kept(tag: BaseTag) -> bool:
        if tag.group == PRIVATE_GROUP or tag in (_ENCRYPTED_ATTRIBUTES, _PIXEL_DATA):
            return False
        if ignore_private and tag.is_private:
            return False
        return not across_sites or (
            tag not in _SITE_QUALIFIED and dataset[tag].VR not in _SHIFTED_VRS
        )

    document = dataset_document(
        Dataset({tag: element for tag, element in dataset.items() if kept(tag)}),
        lambda element: hashlib.sha256(element.value).hexdigest(),
    )
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def _check_ownership(
    known: Ownership,
    owner: StudyOwner | None,
    key: str,
    patient_id: str,
    *,
    study_instance_uid: str,
    sop_instance_uid: str,
) -> None:
    """InstanceConflict when storing this instance under `key` would change what the domain
    holds: an instance stored under another key, a new instance in a study of another
    patient pseudonym, a series of another study. A stored instance sent again passes:
    its stored twin decides (`IngestPipeline._stored_twin`)."""
    conflict = None
    if known.instance_object_key not in (None, key):
        conflict = "the instance is stored in another study or series"
    elif known.instance_object_key == key:
        return
    elif owner is not None and owner.patient_id != patient_id:
        conflict = "the study is stored under another patient pseudonym"
    elif known.series_study_instance_uid not in (None, study_instance_uid):
        conflict = "the series is stored in another study"
    if conflict is not None:
        raise InstanceConflict(
            conflict, study_instance_uid=study_instance_uid, sop_instance_uid=sop_instance_uid
        )


def same_instance(
    stored: Dataset, received: Dataset, *, across_sites: bool = False, ignore_private: bool = False
) -> bool:
    """Whether two stores of an instance hold the same thing: equal attributes, and pixel
    data equal as bytes or, when encoded differently (say, a re-send in another transfer
    syntax that was kept as sent), as decoded pixels. `across_sites`: stored by another
    site, whose pseudonyms and date shift may be qualified by that site (no issuer).
    `ignore_private`: private attributes aside (a PACS sending a stored instance back)."""
    if _content_digest(
        stored, across_sites=across_sites, ignore_private=ignore_private
    ) != _content_digest(received, across_sites=across_sites, ignore_private=ignore_private):
        return False
    stored_pixels, received_pixels = stored.get("PixelData"), received.get("PixelData")
    if stored_pixels is None or received_pixels is None:
        return stored_pixels is received_pixels
    if bytes(stored_pixels) == bytes(received_pixels):
        return True
    try:
        return bool(np.array_equal(stored.pixel_array, received.pixel_array))
    except Exception:  # noqa: BLE001 — pixels that cannot be decoded are not shown equal
        return False


def _failure_of(exc: Exception) -> tuple[int, str]:
    """(failure reason, explanation) of a quarantined instance; the explanation names no
    value of the instance."""
    if isinstance(exc, InstanceConflict):
        return exc.failure_reason, exc.reason
    if isinstance(exc, BurnedInAnnotationRisk):
        return StoreStatus.NOT_AUTHORIZED, (
            "its pixels may show identity (burned-in annotation) and no pixel "
            "mask is configured for it: it cannot leave the site"
        )
    if isinstance(exc, DecodeLimitExceeded):  # sizes only: no value of the instance
        return StoreStatus.OUT_OF_RESOURCES, f"refused before decoding: {str(exc)[:300]}"
    if isinstance(exc, DeidentificationError):
        return StoreStatus.NOT_AUTHORIZED if isinstance(
            exc, NotOfTheDomain
        ) else StoreStatus.CANNOT_UNDERSTAND, str(exc)[:300]
    return StoreStatus.CANNOT_UNDERSTAND, f"the data set cannot be read ({type(exc).__name__})"


_UNREADABLE_FILE: tuple[type[Exception], ...] = (*UNREADABLE_DATASET_ERRORS, OSError)


def _header_of(path: Path) -> Dataset:
    try:  # bounded: the instance may be quarantined for inflating past its declared size
        return read_bounded(path, stop_before_pixels=True, check=False)
    except _UNREADABLE_FILE:  # DecodeLimitExceeded too: a ValueError
        return Dataset()


def _withheld_reason(exc: Exception) -> str | None:
    """What a study's recipients are told of a quarantined instance; None when nothing is
    missing from any study (a conflict: the stored instance stays; the region refusing an
    object that is of no study of the domain)."""
    if isinstance(exc, InstanceConflict | NotOfTheDomain):
        return None
    if isinstance(exc, BurnedInAnnotationRisk):
        return "pixels_may_identify"
    if isinstance(exc, DecodeLimitExceeded):
        return "too_large"
    return "not_deidentifiable"


def _stored_outcome(dataset: Dataset, coerced: bool) -> InstanceOutcome:
    return InstanceOutcome(
        stored=True,
        sop_class_uid=str(dataset.SOPClassUID),
        study_instance_uid=str(dataset.StudyInstanceUID),
        series_instance_uid=str(dataset.SeriesInstanceUID),
        sop_instance_uid=str(dataset.SOPInstanceUID),
        coerced=coerced,
    )


@dataclass(frozen=True)
class _Prepared:
    """An instance ready to be written: its object's key and bytes, and what its index
    record needs."""

    key: str
    dataset: Dataset
    body: bytes
    study: str
    series: str
    sop: str
    site_id: str
    study_site_id: str
    coerced: bool


def _raise(exc: BaseException) -> Callable[[], tuple[InstanceRecord, InstanceOutcome]]:
    def result() -> tuple[InstanceRecord, InstanceOutcome]:
        raise exc

    return result


def _value(
    done: tuple[InstanceRecord, InstanceOutcome],
) -> Callable[[], tuple[InstanceRecord, InstanceOutcome]]:
    return lambda: done


@dataclass
class IngestPipeline:
    """Dependencies of the ingest path, passed in by the composition root."""

    store: ObjectStore
    index: IndexRepository
    policy: DeidentificationPolicy
    spool_root: Path
    quarantine_root: Path
    codec: Codec | None = Codec.HTJ2K
    #: Where Security Alerts go (the audit trail); None: logged only.
    audit: Callable[[Sequence[AuditEntry]], None] | None = None
    #: The region's pipeline: no secret (`policy.keys` is None), only objects of the domain,
    #: written back into any site's study (the regional API checked each writer's scope).
    region: bool = False
    #: Largest decoded pixel data an instance may declare: above, it is quarantined.
    decode_limits: DecodeLimits = DEFAULT_DECODE_LIMITS

    def batch_dir(self, site_id: str, batch_id: str) -> Path:
        return self.spool_root / _checked_name(site_id, "site") / _checked_name(batch_id, "batch")

    def ingest_batch(
        self, site_id: str, batch_id: str, claim: BatchClaim | None = None
    ) -> IngestReport:
        """Process every spooled instance of a batch under its claim (`spool.claims`: taken
        here, waiting for a writer or another worker to let go, unless the caller holds
        it); raise TransientPipelineError to retry, having recorded when (`spool.recovery`)."""
        directory = self.batch_dir(site_id, batch_id)
        held = claim or BatchClaim.acquire(directory, wait=True)
        if held is None:
            report = IngestReport(site_id, batch_id)
            report.missing = True  # already processed by an earlier delivery of this task
            return report
        try:
            previous = record_started(directory)
            try:
                report = self._ingest_claimed(site_id, batch_id, directory)
            except TransientPipelineError as exc:
                record_retry(directory, previous, exc.reason)
                raise
            except Exception as exc:
                record_retry(directory, previous, type(exc).__name__)
                raise
            if directory.is_dir() and any(directory.glob(f"*{SPOOL_SUFFIX}")):
                record_retry(directory, previous, "instances left")
            return report
        finally:
            if claim is None:
                held.release()

    def _ingest_claimed(self, site_id: str, batch_id: str, directory: Path) -> IngestReport:
        started = time.perf_counter()
        report = IngestReport(site_id, batch_id)
        if not any(directory.glob(f"*{SPOOL_SUFFIX}")):
            self._remove_if_empty(directory)
            report.missing = True  # already processed by an earlier delivery of this task
            return report
        wants_reply = reply_requested(directory)
        records: list[InstanceRecord] = []
        done: list[Path] = []
        owners: dict[str, StudyOwner] = {}

        def settle(
            path: Path, result: Callable[[], tuple[InstanceRecord, InstanceOutcome]]
        ) -> None:
            try:
                record, outcome = result()
            except (StorageError, SQLAlchemyError) as exc:
                raise TransientPipelineError(f"{type(exc).__name__}: {exc}") from exc
            except _QUARANTINE as exc:
                report.outcomes[path.name] = self._quarantine(path, site_id, batch_id, exc)
                report.quarantined += 1
                if isinstance(exc, InstanceConflict):
                    self._alert(site_id, exc)
                return
            records.append(record)
            done.append(path)
            report.outcomes[path.name] = outcome

        # One instance's objects are written while the next one is read, de-identified and
        # compressed: the writes (fsync, or an S3 round trip) overlap that CPU work. One
        # write is in flight at a time, so at most two instances are held.
        writing: tuple[Path, Future[tuple[InstanceRecord, InstanceOutcome]]] | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="object-writes") as writer:
            # (leaving the block, on an error too, waits for the write in flight)
            for path in sorted(directory.glob(f"*{SPOOL_SUFFIX}")):
                try:
                    prepared = self._prepare_file(path, site_id, owners)
                except FileNotFoundError:
                    continue  # a concurrent delivery of the same batch finished this file
                except _SETTLED as exc:
                    settle(path, _raise(exc))  # quarantined, or raises: the batch is retried
                    continue
                if writing is not None:
                    settle(writing[0], writing[1].result)
                    writing = None
                if isinstance(prepared, _Prepared):
                    writing = (path, writer.submit(self._write_instance, prepared))
                else:  # nothing to write (a stored instance sent back)
                    settle(path, _value(prepared))
            if writing is not None:
                settle(writing[0], writing[1].result)
        try:
            self.index.upsert_instances(records)
        except SQLAlchemyError as exc:
            raise TransientPipelineError(f"index unavailable: {type(exc).__name__}") from exc
        if wants_reply:  # searchable now: the waiting writer may answer
            self._reply(site_id, batch_id, report.outcomes)
        for path in done:  # the spool is deleted last: a crash before here only repeats work
            path.unlink(missing_ok=True)
        self._remove_if_empty(directory)
        report.stored = len(records)
        report.stored_study_uids = {str(r.study["study_instance_uid"]) for r in records}
        report.seconds = time.perf_counter() - started
        log.info(
            "batch %s/%s: %d stored, %d quarantined in %.3fs",
            site_id,
            batch_id,
            report.stored,
            report.quarantined,
            report.seconds,
        )
        return report

    def _reply(self, site_id: str, batch_id: str, outcomes: dict[str, InstanceOutcome]) -> None:
        """Publish the batch's outcomes, with those an earlier delivery quarantined."""
        reply = BatchReply(dict(outcomes))
        folder = self.quarantine_root / site_id / batch_id
        for reason_path in folder.glob(f"*{SPOOL_SUFFIX}.reason.json"):
            name = reason_path.name.removesuffix(".reason.json")
            if name not in reply.instances:
                try:
                    reason = json.loads(reason_path.read_bytes())
                except (OSError, ValueError):
                    continue
                reply.instances[name] = InstanceOutcome(
                    stored=False,
                    sop_class_uid=str(reason.get("sop_class_uid", "")),
                    failure_reason=int(reason.get("failure_reason", StoreStatus.CANNOT_UNDERSTAND)),
                    reason=str(reason.get("explanation", "")),
                )
        try:
            write_reply(self.spool_root, site_id, batch_id, reply)
        except OSError as exc:  # the writer then says the instances are still processed
            log.error("batch %s/%s: reply not written (%s)", site_id, batch_id, type(exc).__name__)

    def _prepare_file(
        self, path: Path, site_id: str, owners: dict[str, StudyOwner]
    ) -> _Prepared | tuple[InstanceRecord, InstanceOutcome]:
        """Everything before the writes: read, recognise, de-identify, check ownership,
        compress, encode, claim the study. A stored instance sent back is answered here."""
        dataset: Dataset = read_bounded(path, self.decode_limits)
        source_syntax = str(dataset.file_meta.TransferSyntaxUID)
        # The batch's site qualifies local identifiers: two hospitals' "12345" differ.
        policy = (
            self.policy
            if site_id == self.policy.site_id
            else dataclasses.replace(self.policy, site_id=site_id)
        )
        local_patient_id = ""  # the local ID's pseudonym beside the INS, for lookups
        written_back = self._domain_of(dataset, owners)
        known: Ownership | None = None
        if written_back is None:
            if self.region:
                raise NotOfTheDomain(
                    "not an object of the domain: the region takes only "
                    "write-backs into the studies it stores"
                )
            local_patient_id = deidentify(dataset, policy).local_patient_id
            coerced = True
        else:
            identity, study_owner, known = written_back
            returned = self._returned_instance(dataset, site_id, study_owner, known)
            if returned is not None:  # at any site: nothing is added
                return returned
            if study_owner.site_id != site_id and not self.region:
                raise InstanceConflict(
                    "the study belongs to another site: write back through the regional API",
                    study_instance_uid=str(dataset.StudyInstanceUID),
                    sop_instance_uid=str(dataset.SOPInstanceUID),
                )
            before = _content_digest(dataset, across_sites=False)
            deidentify(dataset, policy, domain=identity)
            coerced = _content_digest(dataset, across_sites=False) != before
        study, series, sop = (
            str(dataset.StudyInstanceUID),
            str(dataset.SeriesInstanceUID),
            str(dataset.SOPInstanceUID),
        )
        key = instance_key(study, series, sop)
        patient_id = str(dataset.get("PatientID", "") or "")
        if (
            known is None
        ):  # de-identified under new UIDs (a write-back keeps those it was read under)
            known = self.index.ownership(study, series, sop)
        owner = self._known_owner(study, known, owners)
        _check_ownership(
            known, owner, key, patient_id, study_instance_uid=study, sop_instance_uid=sop
        )
        compression = "none"
        if self.codec is not None:
            outcome = transcode_lossless(dataset, self.codec, self.decode_limits)
            compression = (
                self.codec.value
                if outcome.status is TranscodeStatus.COMPRESSED
                else outcome.status.value
            )
            if outcome.status is TranscodeStatus.VERIFICATION_FAILED:
                log.error(
                    "lossless verification failed; original syntax stored (%s)", outcome.reason
                )
        # The site is named in objects only when institution identity is retained.
        retains_site = ProfileOption.RETAIN_INSTITUTION_IDENTITY in policy.options
        stamp_provenance(
            dataset, site_id if retains_site else "", source_syntax, compression, local_patient_id
        )
        body = encode_dataset(dataset)
        if owner is None:  # claimed only now: an instance refused above claims nothing
            owner = owners[study] = claim_study(self.store, study, StudyOwner(site_id, patient_id))
            # Another site claimed it since, for another patient: nothing of ours is written.
            _check_ownership(
                known, owner, key, patient_id, study_instance_uid=study, sop_instance_uid=sop
            )
        return _Prepared(key, dataset, body, study, series, sop, site_id, owner.site_id, coerced)

    def _write_instance(self, prepared: _Prepared) -> tuple[InstanceRecord, InstanceOutcome]:
        """The object and its DICOM JSON, each written once; the index record."""
        dataset, body = prepared.dataset, prepared.body
        try:
            self.store.create(prepared.key, body)
        except AlreadyExists:
            dataset, body = self._stored_twin(
                prepared.key, dataset, body, across_sites=prepared.study_site_id != prepared.site_id
            )
        study, series, sop = prepared.study, prepared.series, prepared.sop
        try:  # written once too: a retry finds it, a conflict never reaches here
            self.store.create(
                instance_metadata_key(study, series, sop),
                instance_json(dataset, study, series, sop),
                content_type="application/dicom+json",
            )
        except AlreadyExists:
            pass
        record = record_for(
            dataset,
            prepared.key,
            body,
            site_id=prepared.site_id,
            study_site_id=prepared.study_site_id,
        )
        return record, _stored_outcome(dataset, prepared.coerced)

    def _domain_of(
        self, dataset: Dataset, owners: dict[str, StudyOwner]
    ) -> tuple[DomainIdentity, StudyOwner, Ownership] | None:
        """The stored study an object belongs to, when it is of this pseudonymization domain
        already: its Study Instance UID is a stored study's (the domain's keyed UIDs are
        never an original's) and its Patient ID that study's patient pseudonym, as the
        study's write-once owner record says (no writer can change it); with what the index
        holds of its UIDs. Else None."""
        study = str(dataset.get("StudyInstanceUID", "") or "").strip()
        patient_id = str(dataset.get("PatientID", "") or "").strip()
        if not (study and PseudonymKeys.is_patient_pseudonym(patient_id)):
            return None  # not a pseudonym: no stored study is this object's (no index query)
        known = self.index.ownership(
            study,
            str(dataset.get("SeriesInstanceUID", "") or ""),
            str(dataset.get("SOPInstanceUID", "") or ""),
        )
        if known.study_site_id is None:
            return None
        owner = self._known_owner(study, known, owners)
        if owner is None or owner.patient_id != patient_id:
            return None
        return (
            DomainIdentity(patient_id, known.study_accession_number, known.study_date),
            owner,
            known,
        )

    def _returned_instance(
        self, dataset: Dataset, site_id: str, owner: StudyOwner, known: Ownership
    ) -> tuple[InstanceRecord, InstanceOutcome] | None:
        """A stored instance sent back as it was retrieved (a PACS re-sending, a viewer
        storing what it loaded): an idempotent success, nothing added; None otherwise.
        `known`: what the index holds of its UIDs."""
        if known.instance_object_key is None:
            return None
        body = self.store.get(known.instance_object_key)
        stored = pydicom.dcmread(BytesIO(body))
        if not same_instance(stored, dataset, ignore_private=True):
            return None  # cleaned, then compared again (a retried write-back) or a conflict
        record = record_for(
            stored, known.instance_object_key, body, site_id=site_id, study_site_id=owner.site_id
        )
        return record, _stored_outcome(stored, coerced=False)

    def _known_owner(
        self, study: str, known: Ownership, owners: dict[str, StudyOwner]
    ) -> StudyOwner | None:
        """The study's owner if it has one yet (read, never written here): from this
        batch, its owner record, or — a study indexed before owners were recorded — the
        index, whose owner is then recorded."""
        owner = owners.get(study) or read_study_owner(self.store, study)
        if owner is None and known.study_site_id is not None:
            owner = claim_study(
                self.store, study, StudyOwner(known.study_site_id, known.study_patient_id or "")
            )
        if owner is not None:
            owners[study] = owner
        return owner

    def _stored_twin(
        self, key: str, dataset: Dataset, body: bytes, *, across_sites: bool
    ) -> tuple[Dataset, bytes]:
        """The stored object under `key` when it holds the same instance as `dataset` (a
        re-send, a retried batch, the study imported at another site): indexed as stored,
        nothing changed. InstanceConflict otherwise."""
        stored = self.store.get(key)
        if stored == body:
            return dataset, body
        stored_dataset = pydicom.dcmread(BytesIO(stored))
        if same_instance(stored_dataset, dataset, across_sites=across_sites):
            return stored_dataset, stored
        raise InstanceConflict(
            "a different instance is stored under these UIDs",
            study_instance_uid=str(dataset.StudyInstanceUID),
            sop_instance_uid=str(dataset.SOPInstanceUID),
            failure_reason=StoreStatus.DUPLICATE_SOP_INSTANCE,
            received_sha256=hashlib.sha256(body).hexdigest(),
            stored_sha256=hashlib.sha256(stored).hexdigest(),
        )

    def _alert(self, site_id: str, conflict: InstanceConflict) -> None:
        """A Security Alert (PS3.15 A.5.3, EventID 110113) in the audit trail."""
        log.warning("instance conflict from site %s: %s", site_id, conflict.reason)
        if self.audit is None:
            return
        detail = {"reason": conflict.reason, "sop_instance_uid": conflict.sop_instance_uid}
        if conflict.stored_sha256:
            detail.update(
                stored_sha256=conflict.stored_sha256, received_sha256=conflict.received_sha256
            )
        code, verb = WORKER_ACTIONS["instance.conflict"]
        alert = AuditEntry(
            at=dt.datetime.now(dt.UTC),
            action="instance.conflict",
            event_code=code,
            event_action=verb,
            outcome=4,
            actor=f"site:{site_id}",
            resource=conflict.sop_instance_uid,
            study_instance_uid=conflict.study_instance_uid,
            detail=json.dumps(detail),
        )
        try:
            self.audit([alert])
        except (SQLAlchemyError, OSError) as exc:  # the quarantine keeps the evidence
            log.error("security alert not written to the audit trail: %s", type(exc).__name__)

    def _quarantine(
        self, path: Path, site_id: str, batch_id: str, exc: Exception
    ) -> InstanceOutcome:
        # Identified data, like the spool it comes from: folders 0700, files 0600.
        target_dir = private_directory(self.quarantine_root / site_id / batch_id)
        target = target_dir / path.name
        failure_reason, explanation = _failure_of(exc)
        header = _header_of(path)
        outcome = InstanceOutcome(
            stored=False,
            sop_class_uid=str(header.get("SOPClassUID", "") or ""),
            failure_reason=failure_reason,
            reason=explanation,
        )
        reason = {
            "reason": type(exc).__name__,
            "detail": str(exc)[:2000],
            "explanation": explanation,
            "failure_reason": failure_reason,
            "sop_class_uid": outcome.sop_class_uid,
            "quarantined_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "site_id": site_id,
            "batch_id": batch_id,
        }
        reason_path = target.with_name(target.name + ".reason.json")
        with open_private(reason_path, exclusive=False) as handle:
            handle.write(json.dumps(reason, indent=2).encode())
        self._record_withheld(header, site_id, exc)  # before the move: a failure retries
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return outcome
        except OSError:
            shutil.move(str(path), str(target))  # another file system: copied with its mode
            os.chmod(target, PRIVATE_FILE_MODE)
        log.warning(
            "batch %s/%s: one instance quarantined (%s)", site_id, batch_id, type(exc).__name__
        )
        return outcome

    def _record_withheld(self, header: Dataset, site_id: str, exc: Exception) -> None:
        """Tell the study's recipients that one of its instances is missing, and why: under
        its de-identified UIDs (those the domain knows it by), never an original. An
        instance whose header cannot be read names no study: nothing is recorded."""
        reason = _withheld_reason(exc)
        uids = [
            text_of(header, k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
        ]
        if reason is None or not all(uids):
            return
        try:
            if self.index.ownership(uids[0], "", "").study_site_id is None:
                # not a stored study's UID (those are the domain's already): an original
                keys = self.policy.keys
                if ProfileOption.RETAIN_UIDS not in self.policy.options:
                    if keys is None:
                        return  # the region holds no secret: it cannot name the study
                    uids = [keys.uid(uid) for uid in uids]
            study, series, sop = uids
            self.index.record_withheld(
                WithheldRecord(
                    study,
                    series,
                    sop,
                    modality=text_of(header, "Modality"),
                    reason=reason,
                    site_id=site_id,
                )
            )
        except SQLAlchemyError as exc_db:
            raise TransientPipelineError(f"index unavailable: {type(exc_db).__name__}") from exc_db

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
