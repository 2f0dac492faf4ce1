"""STOW-RS (PS3.18 §10.5): multipart/related instances into the site's spool.

The body is parsed as it arrives and each part is written to a temporary file in the spool
(never the whole body in memory); each DICOM part is then spooled like a C-STORE, the
batches are handed to the worker, and the answer waits for the worker's reply
(`spool.replies`): it names the UIDs each instance is stored and searchable under, with
its RetrieveURL, a B000 warning where attributes were coerced, and the instances that will
not be stored with their reason (read-your-writes, like a PACS that stores in-request).
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
import re
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filereader import read_partial
from pydicom.pixels.utils import pixel_array
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian
from python_multipart.multipart import MultipartParser

from imaging import (
    DEFAULT_DECODE_LIMITS,
    UNREADABLE_DATASET_ERRORS,
    DecodeLimitExceeded,
    DecodeLimits,
    StoreStatus,
    check_declared,
    read_bounded,
)
from imaging.dicom_model import dataset_document
from spool import (
    BatchClaim,
    InstanceOutcome,
    Spool,
    SpoolWriteError,
    hand_over,
    incoming_dir,
    new_association_tag,
    open_private,
    private_directory,
    remove_older_than,
    remove_stale_replies,
    request_reply,
    take_reply,
)
from storage import AccessScope
from web_viewer_api.dicomweb.multipart import parse_accept

log = logging.getLogger(__name__)
_UNREADABLE: tuple[type[Exception], ...] = (*UNREADABLE_DATASET_ERRORS, OSError)

#: PS3.18 Table 10.5.3-2 warning: the stored instance differs from the one sent.
COERCION_OF_DATA_ELEMENTS = 0xB000
#: Refused by the regional API: not an object of the domain (identified, or outside every
#: stored study). A "Cxxx cannot understand" failure of our own, explained in the Warning.
NOT_OF_THE_DOMAIN = 0xC001
NOT_OF_THE_DOMAIN_WARNING = (
    '299 dicom-gateway "refused {count} instance(s) not of the pseudonymization domain '
    "(FailureReason C001): the regional API holds no pseudonymization secret and takes "
    "only objects written back into studies it stores and this credential may read, under "
    "the study's patient pseudonym (its PatientID); send identified studies to the "
    'producing site (its DICOM node or its API)"'
)


class StowRequestError(Exception):
    """The request as a whole is refused; `status` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class StowTarget:
    """Where STOW-RS puts instances: the site's spool, and how batches reach the worker."""

    spool: Spool
    #: (site, batch) -> hands the batch over; returns the broker's identity (or None).
    enqueue: Callable[[str, str], str | None]
    max_bytes: int = 2 * 1024**3
    #: The regional API: (Study Instance UID, writer's scope) -> the patient pseudonym of
    #: that study if the index stores it within the scope, else None. When set, only
    #: objects of the domain are taken (into a stored study the writer may read, under its
    #: patient pseudonym); anything else may be identified and is refused.
    study_patient: Callable[[str, AccessScope], str | None] | None = None
    #: How long an answer waits for the worker before saying what is still being processed.
    reply_seconds: float = 60.0
    #: Largest decoded pixel data an instance may declare: above, it is refused unspooled.
    decode_limits: DecodeLimits = DEFAULT_DECODE_LIMITS
    #: Most parts in one request (413 above): each costs a file and an entry in the answer.
    max_parts: int = 10_000
    #: Whether something processes this spool now (a live worker's mark on it); a request
    #: is refused (503) before anything is read when it says no. None: not checked (the
    #: regional API processes its write-backs itself).
    processed: Callable[[], bool] | None = None

    @property
    def incoming(self) -> Path:
        """Where request parts are written while they arrive (before the spool)."""
        return incoming_dir(self.spool.root)

    def clean_orphans(self, older_than_seconds: float = 3600.0) -> int:
        """Remove parts left by an API process that died mid-upload (nothing in them was
        acknowledged). Only old ones: another API process may be receiving right now."""
        removed = remove_older_than(self.incoming.glob(".stow-*.part"), older_than_seconds)
        if removed:
            log.info("STOW-RS: removed %d parts of interrupted uploads", removed)
        remove_stale_replies(self.spool.root)  # replies of answers that gave up waiting
        return removed


@dataclass
class _Part:
    path: Path
    headers: dict[str, str] = field(default_factory=dict)
    size: int = 0
    #: Refused before anything of it was written: (SOP class, SOP instance, reason).
    refused: tuple[str, str, int] | None = None


#: The regional API decides on a part from its first bytes, held in memory: nothing of an
#: instance it refuses is ever written to its disk. A header not decided within this much
#: (the attributes up to Study Instance UID) is refused.
SCREEN_BYTES = 1024 * 1024
_LAST_SCREENED_TAG = 0x0020000D  # StudyInstanceUID


def screen_part(
    head: bytes, complete: bool, study_patient: Callable[[str], str | None]
) -> tuple[str, str, int] | None | bool:
    """The regional API's verdict on a part from its first bytes: None to take it, the
    refusal (SOP class, SOP instance, reason), or False when more bytes are needed."""
    seen_past = False

    def stop(tag: int, _vr: str | None, _length: int) -> bool:
        nonlocal seen_past
        seen_past = tag > _LAST_SCREENED_TAG
        return seen_past

    try:
        with warnings.catch_warnings():  # a truncated head: pydicom's warnings quote values
            warnings.simplefilter("ignore")
            header = read_partial(io.BytesIO(head), stop_when=stop)
            sop_class = str(header.get("SOPClassUID", ""))
            sop = str(header.get("SOPInstanceUID", ""))
            study = str(header.get("StudyInstanceUID", ""))
            patient_id = str(header.get("PatientID", ""))
    except _UNREADABLE:
        return (
            ("", "", StoreStatus.CANNOT_UNDERSTAND)
            if complete or len(head) >= SCREEN_BYTES
            else False
        )
    if not (seen_past or complete):
        return ("", "", NOT_OF_THE_DOMAIN) if len(head) >= SCREEN_BYTES else False
    if not (sop and study):
        return ("", "", StoreStatus.CANNOT_UNDERSTAND)
    if not of_the_domain(patient_id, study, study_patient):
        return (sop_class, sop, NOT_OF_THE_DOMAIN)
    return None


def of_the_domain(patient_id: str, study: str, study_patient: Callable[[str], str | None]) -> bool:
    """What the regional API takes: an object of the domain, written back into a study the
    index stores under that study's patient pseudonym — keyed values no original carries
    (the worker checks it again against the study's write-once owner record)."""
    pseudonym = study_patient(study)
    return pseudonym is not None and patient_id.strip() == pseudonym


@dataclass(frozen=True)
class StoredInstance:
    """An instance stored and searchable: the UIDs it is stored under (de-identified at a
    site, the domain's for a write-back), and whether attributes were coerced."""

    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    coerced: bool = False


@dataclass
class StowOutcome:
    referenced: list[StoredInstance] = field(default_factory=list)
    #: (SOP class, SOP instance as sent, failure reason, explanation).
    failed: list[tuple[str, str, int, str]] = field(default_factory=list)
    #: Spooled, durable, not yet processed when the answer could wait no longer: (SOP
    #: class, SOP instance as sent).
    pending: list[tuple[str, str]] = field(default_factory=list)
    #: Spooled and awaited: (site, batch, spool file name) -> (SOP class, SOP instance as sent).
    awaited: dict[tuple[str, str, str], tuple[str, str]] = field(default_factory=dict)
    waited_seconds: float = 0.0

    def refuse(self, sop_class: str, sop: str, reason: int, explanation: str = "") -> None:
        self.failed.append((sop_class, sop, reason, explanation))

    @property
    def headers(self) -> dict[str, str]:
        """Warning headers (PS3.18 §8.6) saying why instances were refused, coerced or are
        still being processed; no value of any instance."""
        warnings_: list[str] = []
        refused = sum(1 for _, _, reason, _ in self.failed if reason == NOT_OF_THE_DOMAIN)
        if refused:
            warnings_.append(NOT_OF_THE_DOMAIN_WARNING.format(count=refused))
        explained: dict[str, int] = {}
        for _, _, reason, explanation in self.failed:
            if reason != NOT_OF_THE_DOMAIN and explanation:
                explained[explanation] = explained.get(explanation, 0) + 1
        for explanation, count in explained.items():
            warnings_.append(_warning(f"{count} instance(s) not stored: {explanation}"))
        coerced = sum(1 for item in self.referenced if item.coerced)
        if coerced:
            warnings_.append(
                _warning(
                    f"{coerced} instance(s) stored with attributes coerced (WarningReason B000): "
                    "de-identified, or a write-back cleaned; ReferencedSOPSequence names the UIDs "
                    "they are stored and retrievable under"
                )
            )
        if self.pending:
            warnings_.append(
                _warning(
                    f"{len(self.pending)} instance(s) accepted and durable but not yet processed "
                    f"after {self.waited_seconds:.0f} s: searchable once the worker has run"
                )
            )
        return {"Warning": ", ".join(warnings_)} if warnings_ else {}

    @property
    def status_code(self) -> int:
        """200 all stored as sent; 202 stored with warnings, failures or still pending;
        409 nothing stored (PS3.18 Table 10.5.3-1)."""
        if not (self.referenced or self.pending):
            return 409 if self.failed else 200
        if self.failed or self.pending or any(item.coerced for item in self.referenced):
            return 202
        return 200

    async def await_replies(self, spool_root: Path, timeout: float) -> None:
        """Wait until the worker replied for every awaited batch (or `timeout`): stored
        instances become `referenced`, refused ones `failed`, the rest `pending`."""
        batches = {(site, batch) for site, batch, _ in self.awaited}
        started = time.monotonic()
        delay = 0.001
        while batches:
            for site, batch in sorted(batches):
                reply = take_reply(spool_root, site, batch)
                if reply is None:
                    continue
                batches.discard((site, batch))
                for (reply_site, reply_batch, name), sent in list(self.awaited.items()):
                    if (reply_site, reply_batch) == (site, batch) and name in reply.instances:
                        self._settle(sent, reply.instances[name])
                        del self.awaited[(reply_site, reply_batch, name)]
            if not batches or time.monotonic() - started >= timeout:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.005)  # a waiting client: look often, it is a stat
        self.waited_seconds = time.monotonic() - started
        self.pending += list(self.awaited.values())
        self.awaited.clear()

    def _settle(self, sent: tuple[str, str], outcome: InstanceOutcome) -> None:
        if outcome.stored:
            self.referenced.append(
                StoredInstance(
                    outcome.sop_class_uid or sent[0],
                    outcome.study_instance_uid,
                    outcome.series_instance_uid,
                    outcome.sop_instance_uid,
                    outcome.coerced,
                )
            )
        else:
            self.refuse(
                outcome.sop_class_uid or sent[0],
                sent[1],
                outcome.failure_reason or StoreStatus.PROCESSING_FAILURE,
                outcome.reason,
            )


def _warning(text: str) -> str:
    """One Warning value (RFC 9111 §5.5), its text kept to what a header can carry."""
    cleaned = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else " " for c in text)
    return f'299 dicom-gateway "{cleaned}"'


DICOM_JSON = "application/dicom+json"


def boundary_of(content_type: str | None) -> tuple[bytes, str]:
    """(boundary, root part type) of a STOW-RS body: `multipart/related` with
    `type="application/dicom"` or `type="application/dicom+json"` (415 otherwise)."""
    ranges = parse_accept(content_type or "")
    if not ranges or ranges[0].media_type != "multipart/related":
        raise StowRequestError(415, 'STOW-RS takes multipart/related; type="application/dicom"')
    media = ranges[0]
    part_type = media.params.get("type", "application/dicom").lower()
    if part_type not in ("application/dicom", DICOM_JSON):
        raise StowRequestError(
            415, "parts must be application/dicom, or application/dicom+json with bulk data"
        )
    boundary = media.params.get("boundary")
    if not boundary:
        raise StowRequestError(400, "multipart body without a boundary")
    if not _BOUNDARY.fullmatch(boundary):
        raise StowRequestError(
            400,
            "the multipart boundary must be 1 to 70 characters: letters, "
            "digits, '()+_,-./:=? and spaces, not ending in a space "
            "(RFC 2046 §5.1.1)",
        )
    return boundary.encode(), part_type


#: RFC 2046 §5.1.1: boundary := 0*69<bchars> bcharsnospace.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
#: Largest header block of one part (its Content-Type, Content-Location...), and most fields.
MAX_PART_HEADER_BYTES = 16 * 1024
MAX_PART_HEADER_FIELDS = 50
#: Largest DICOM JSON part, and deepest nesting of arrays and objects in it (each sequence
#: level of a data set takes three: attribute, Value, item): 42 sequence levels.
MAX_JSON_PART_BYTES = 64 * 1024 * 1024
MAX_JSON_DEPTH = 128


#: Compressed pixel data media types (PS3.18 §8.7.3.3.2) and their default transfer syntax.
COMPRESSED_MEDIA_TYPES = {
    "image/jls": "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "image/jp2": "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "image/jphc": "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "image/jpeg": "1.2.840.10008.1.2.4.70",  # JPEG lossless, first-order prediction
    "image/dicom-rle": "1.2.840.10008.1.2.5",  # RLE lossless
}
_PIXEL_DATA = "7FE00010"


def _media(part: _Part) -> tuple[str, Mapping[str, str]]:
    media = parse_accept(part.headers.get("content-type", ""))
    if not media:
        return "", {}
    return media[0].media_type, media[0].params


def _compressed_pixel_data(dataset: Dataset, frames: list[_Part]) -> str:
    """Encapsulate compressed frame parts (one frame per part, in order, all sharing the
    BulkDataURI) as the data set's Pixel Data; the transfer syntax they are in."""
    syntaxes = set()
    for part in frames:
        media_type, params = _media(part)
        syntaxes.add(params.get("transfer-syntax") or COMPRESSED_MEDIA_TYPES[media_type])
    if len(syntaxes) != 1:
        raise ValueError("the frames of one instance are in different transfer syntaxes")
    syntax = pydicom.uid.UID(syntaxes.pop())
    if not syntax.is_compressed or not syntax.is_encapsulated:
        raise ValueError(f"{syntax} is not a compressed transfer syntax")
    expected = int(dataset.get("NumberOfFrames", 1) or 1)
    if expected != len(frames):
        raise ValueError(f"{len(frames)} frame parts for NumberOfFrames {expected}")
    dataset.PixelData = encapsulate([part.path.read_bytes() for part in frames])
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    return str(syntax)


def json_parts_to_instances(parts: list[_Part], folder: Path) -> tuple[list[_Part], int]:
    """Turn DICOM JSON parts (+ bulk data parts named by Content-Location) into Part 10 files.

    Returns the instance parts and how many data sets could not be built. Bulk data is
    application/octet-stream (native), or — for Pixel Data — compressed frames
    (`image/jls`, `image/jp2`, `image/jphc`, `image/jpeg`, `image/dicom-rle`, with an
    optional `transfer-syntax` parameter): one part per frame, all under the BulkDataURI,
    stored encapsulated in that syntax after checking that the first frame decodes.
    A DICOM JSON part larger than MAX_JSON_PART_BYTES, or nested deeper than
    MAX_JSON_DEPTH, counts as one data set not built. Every file of `parts` is removed,
    and on an error every file written here too.
    """
    instances: list[_Part] = []
    try:
        built, failed = _build_instances(parts, folder, instances)
    except BaseException:
        for instance in instances:
            instance.path.unlink(missing_ok=True)
        raise
    finally:
        for part in parts:
            part.path.unlink(missing_ok=True)
    return built, failed


def _json_depth(document: Any) -> int:
    """How deeply arrays and objects nest in `document` (a scalar: 0), without recursion."""
    deepest, pending = 0, [(document, 1)]
    while pending:
        value, depth = pending.pop()
        children = (
            value.values()
            if isinstance(value, dict)
            else value
            if isinstance(value, list)
            else None
        )
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            break
        pending.extend((child, depth + 1) for child in children)
    return deepest


def _load_json_part(part: _Part) -> Any | None:
    """The part's JSON document, or None when it is not JSON or over the limits."""
    if part.size > MAX_JSON_PART_BYTES:
        log.info("STOW-RS: a DICOM JSON part is larger than %d bytes", MAX_JSON_PART_BYTES)
        return None
    try:
        loaded = json.loads(part.path.read_bytes())
    except (ValueError, RecursionError):  # the decoder's own depth limit: nested too deep
        return None
    if _json_depth(loaded) > MAX_JSON_DEPTH:
        log.info("STOW-RS: a DICOM JSON part nests deeper than %d", MAX_JSON_DEPTH)
        return None
    return loaded


def _build_instances(
    parts: list[_Part], folder: Path, instances: list[_Part]
) -> tuple[list[_Part], int]:
    by_location: dict[str, list[_Part]] = {}
    for part in parts:
        location = part.headers.get("content-location")
        if location:
            by_location.setdefault(location, []).append(part)
    documents: list[Any] = []
    failed = 0
    for part in parts:
        if _media(part)[0] == DICOM_JSON:
            loaded = _load_json_part(part)
            if loaded is None:
                failed += 1
                continue
            documents.extend(loaded if isinstance(loaded, list) else [loaded])

    for document in documents:
        compressed: list[_Part] = []
        written: _Part | None = None

        def bulk(tag: str, vr: str, uri: str, compressed: list[_Part] = compressed) -> bytes:
            sources = by_location.get(uri)
            if not sources:
                raise KeyError(f"no part at {uri}")
            if tag.upper() == _PIXEL_DATA and _media(sources[0])[0] in COMPRESSED_MEDIA_TYPES:
                compressed.extend(sources)
                return b""
            return sources[0].path.read_bytes()

        try:
            dataset = Dataset.from_json(document, bulk_data_uri_handler=bulk)
            syntax: str = ExplicitVRLittleEndian
            if compressed:
                syntax = _compressed_pixel_data(dataset, compressed)
            dataset.file_meta = FileMetaDataset()
            dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
            dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
            dataset.file_meta.TransferSyntaxUID = pydicom.uid.UID(syntax)
            if compressed:
                pixel_array(dataset, index=0)  # a stream that does not decode fails here
            written = _Part(
                folder / f".stow-{uuid.uuid4().hex}.part", {"content-type": "application/dicom"}
            )
            instances.append(written)  # from here on, removed whatever happens next
            with open_private(written.path) as handle:  # identified until the worker ran: 0600
                dataset.save_as(handle, enforce_file_format=True)
            written.size = written.path.stat().st_size
        except (
            KeyError,
            ValueError,
            TypeError,
            AttributeError,
            OSError,
            RuntimeError,
            NotImplementedError,
        ) as exc:  # RecursionError is a RuntimeError
            log.info("STOW-RS: a DICOM JSON data set could not be built: %s", type(exc).__name__)
            if written is not None:
                instances.remove(written)
                written.path.unlink(missing_ok=True)
            failed += 1
            continue
    return instances, failed


async def receive_parts(
    body: AsyncIterator[bytes],
    boundary: bytes,
    folder: Path,
    max_bytes: int,
    study_patient: Callable[[str], str | None] | None = None,
    *,
    max_parts: int = 10_000,
) -> list[_Part]:
    """Stream the body into one temporary file per part. With `study_patient` (the regional
    API), each part is screened from its first bytes, in memory: a part not of the domain
    is refused (`_Part.refused`) and never written. StowRequestError: 413 beyond
    `max_bytes` or `max_parts`, 400 for a malformed body or a part's headers over
    MAX_PART_HEADER_BYTES / MAX_PART_HEADER_FIELDS; then no file of the request remains."""
    private_directory(folder)  # identified uploads: folder 0700, parts 0600
    parts: list[_Part] = []
    current: dict[str, Any] = {
        "field": b"",
        "value": b"",
        "handle": None,
        "head": None,
        "header_bytes": 0,
    }
    if study_patient is not None:  # one index query per study of the request, not per part
        study_patient = functools.cache(study_patient)

    def open_part(part: _Part) -> None:
        current["handle"] = open_private(part.path)  # closed in on_part_end/_discard

    def screen(complete: bool) -> None:
        part, head = parts[-1], current["head"]
        if study_patient is None:  # only a regional API screens parts
            return
        content_type = part.headers.get("content-type", "application/dicom").split(";")[0]
        verdict = (
            ("", "", StoreStatus.CANNOT_UNDERSTAND)
            if content_type.strip().lower() != "application/dicom"
            else screen_part(bytes(head), complete, study_patient)
        )
        if verdict is False:
            return
        current["head"] = None
        if verdict is not None:
            part.refused = verdict  # type: ignore[assignment]
            return
        open_part(part)
        current["handle"].write(head)

    def on_part_begin() -> None:
        if len(parts) >= max_parts:
            raise StowRequestError(413, f"more than {max_parts} parts in one request")
        current["header_bytes"] = 0
        part = _Part(folder / f".stow-{uuid.uuid4().hex}.part")
        parts.append(part)
        if study_patient is None:
            open_part(part)
        else:
            current["head"] = bytearray()

    def header_bytes(count: int) -> None:
        current["header_bytes"] += count
        if current["header_bytes"] > MAX_PART_HEADER_BYTES:
            raise StowRequestError(
                400, f"a part's headers are longer than {MAX_PART_HEADER_BYTES} bytes"
            )

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_bytes(end - start)
        current["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_bytes(end - start)
        current["value"] += data[start:end]

    def on_header_end() -> None:
        if len(parts[-1].headers) >= MAX_PART_HEADER_FIELDS:
            raise StowRequestError(
                400, f"a part has more than {MAX_PART_HEADER_FIELDS} header fields"
            )
        name = current["field"].decode("latin-1").strip().lower()
        parts[-1].headers[name] = current["value"].decode("latin-1").strip()
        current["field"], current["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].size += end - start
        if current["head"] is not None:
            current["head"] += data[start:end]
            screen(complete=False)
        elif current["handle"] is not None:
            current["handle"].write(data[start:end])

    def on_part_end() -> None:
        if current["head"] is not None:
            screen(complete=True)
        if current["handle"] is not None:
            current["handle"].close()
            current["handle"] = None

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    received = 0
    try:
        async for chunk in body:
            received += len(chunk)
            if received > max_bytes:
                raise StowRequestError(413, f"request body larger than {max_bytes} bytes")
            parser.write(chunk)
        parser.finalize()
    except StowRequestError:
        _discard(parts, current)
        raise
    except Exception as exc:  # the parser's own errors: a malformed body
        _discard(parts, current)
        raise StowRequestError(400, f"malformed multipart body: {type(exc).__name__}") from exc
    except BaseException:  # the client went away (cancelled): nothing of it stays on disk
        _discard(parts, current)
        raise
    if current["handle"] is not None or current["head"] is not None or not parts:
        _discard(parts, current)
        raise StowRequestError(
            400, "malformed multipart body: no complete part (wrong boundary or truncated body)"
        )
    return parts


def _discard(parts: list[_Part], current: dict[str, Any]) -> None:
    if current.get("handle") is not None:
        current["handle"].close()
    for part in parts:
        part.path.unlink(missing_ok=True)


def _spool_each(
    parts: list[_Part],
    target: StowTarget,
    study_in_path: str | None,
    study_patient: Callable[[str], str | None] | None,
    outcome: StowOutcome,
    tag: str,
    batches: set[str],
    claims: dict[str, BatchClaim],
) -> None:
    """Check each part and move the good ones into their study's batch (claimed first);
    every part's file is gone when this returns."""
    try:
        for part in parts:
            if part.refused is not None:
                outcome.refuse(*part.refused)
                continue
            content_type = part.headers.get("content-type", "application/dicom").split(";")[0]
            if content_type.strip().lower() != "application/dicom":
                outcome.refuse(
                    "", "", StoreStatus.CANNOT_UNDERSTAND, "a part is not application/dicom"
                )
                continue
            try:
                header = read_bounded(part.path, stop_before_pixels=True, check=False)
                sop_class = str(header.SOPClassUID)
                sop = str(header.SOPInstanceUID)
                study = str(header.StudyInstanceUID)
                patient_id = str(header.get("PatientID", ""))
            except _UNREADABLE:
                outcome.refuse(
                    "", "", StoreStatus.CANNOT_UNDERSTAND, "a part is not a readable DICOM data set"
                )
                continue
            try:
                check_declared(header, target.decode_limits)
            except DecodeLimitExceeded as exc:
                outcome.refuse(
                    sop_class, sop, StoreStatus.OUT_OF_RESOURCES, f"refused before decoding: {exc}"
                )
                continue
            # Screened from its head already; checked again on the whole part as spooled.
            if study_patient is not None and not of_the_domain(patient_id, study, study_patient):
                outcome.refuse(sop_class, sop, NOT_OF_THE_DOMAIN)
                continue
            if study_in_path is not None and study != study_in_path:
                outcome.refuse(
                    sop_class,
                    sop,
                    StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
                    "its Study Instance UID is not the study of the request path",
                )
                continue
            batch = target.spool.batch_id(tag, study)
            try:
                if batch not in claims:
                    claims[batch] = target.spool.claim(batch)
                path = target.spool.move_file(batch, sop, part.path)
            except ValueError:
                outcome.refuse(
                    sop_class,
                    sop,
                    StoreStatus.CANNOT_UNDERSTAND,
                    "its SOP Instance UID is not a valid UID",
                )
                continue
            except SpoolWriteError:
                outcome.refuse(
                    sop_class, sop, StoreStatus.OUT_OF_RESOURCES, "the spool could not take it"
                )
                continue
            batches.add(batch)
            outcome.awaited[(target.spool.site_id, batch, path.name)] = (sop_class, sop)
    finally:
        for part in parts:
            part.path.unlink(missing_ok=True)


def spool_parts(
    parts: list[_Part],
    target: StowTarget,
    study_in_path: str | None,
    study_patient: Callable[[str], str | None] | None = None,
) -> StowOutcome:
    """Check each part, spool the good ones per study, mark each batch as awaited and
    enqueue it (`StowOutcome.await_replies` then waits for the worker). `study_patient`:
    the regional API's check, bound to the writer's scope."""
    outcome = StowOutcome()
    tag = new_association_tag()
    batches: set[str] = set()
    # Each batch held from its first part to its hand-over (`spool.claims`): were this
    # process to die in between, the workers' recovery loop sends the batch at once.
    claims: dict[str, BatchClaim] = {}
    try:
        _spool_each(parts, target, study_in_path, study_patient, outcome, tag, batches, claims)
    except BaseException:
        for claim in claims.values():
            claim.release()
        raise
    for batch, claim in sorted(claims.items()):
        try:
            if batch in batches:
                request_reply(claim.directory)
        except OSError as exc:  # still processed; the answer says it is pending
            log.error("STOW batch %s: reply not requested (%s)", batch, type(exc).__name__)
        try:
            if batch in batches:
                hand_over(claim.directory, lambda name: target.enqueue(target.spool.site_id, name))
        except Exception as exc:  # noqa: BLE001 - broker down: the workers' recovery loop sends it
            log.error(
                "STOW batch %s not enqueued (%s); the workers will send it",
                batch,
                type(exc).__name__,
            )
        finally:
            claim.release()
    return outcome


def response_dataset(outcome: StowOutcome, base_url: str) -> dict[str, Any]:
    """The STOW-RS response body (PS3.18 Table 10.5.3-3) as DICOM JSON: the stored UIDs
    with their RetrieveURL (and the study's, when all are in one study), WarningReason
    B000 where attributes were coerced, and the failed instances with their reason."""
    dataset = Dataset()
    referenced = []
    for stored in outcome.referenced:
        item = Dataset()
        item.ReferencedSOPClassUID = stored.sop_class_uid
        item.ReferencedSOPInstanceUID = stored.sop_instance_uid
        item.RetrieveURL = (
            f"{base_url}/studies/{stored.study_instance_uid}/series/"
            f"{stored.series_instance_uid}/instances/{stored.sop_instance_uid}"
        )
        if stored.coerced:
            item.WarningReason = COERCION_OF_DATA_ELEMENTS
        referenced.append(item)
    for sop_class, sop in outcome.pending:  # durable, not yet processed: as sent, no URL
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop
        referenced.append(item)
    failed = []
    for sop_class, sop, reason, _ in outcome.failed:
        item = Dataset()
        if sop:
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop
        item.FailureReason = reason
        failed.append(item)
    studies = {stored.study_instance_uid for stored in outcome.referenced}
    if len(studies) == 1 and not outcome.pending:
        dataset.RetrieveURL = f"{base_url}/studies/{studies.pop()}"
    if referenced:
        dataset.ReferencedSOPSequence = Sequence(referenced)
    if failed:
        dataset.FailedSOPSequence = Sequence(failed)
    return dataset_document(dataset)


__all__ = [
    "NOT_OF_THE_DOMAIN",
    "SCREEN_BYTES",
    "StoredInstance",
    "StowOutcome",
    "StowRequestError",
    "StowTarget",
    "boundary_of",
    "json_parts_to_instances",
    "receive_parts",
    "response_dataset",
    "screen_part",
    "spool_parts",
]
