"""WADO-RS (PS3.18 §10.4): instances, metadata, frames and rendered images from the store.

Instances stream one object at a time (memory bounded by the largest instance, never by
the study). Transfer syntaxes are negotiated from the Accept header: `*` returns what is
stored; Explicit VR Little Endian (the standard's default) decompresses; a lossless
syntax transcodes with the worker's verified encoder; anything else is 406.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from imaging import (
    DEFAULT_DECODE_LIMITS,
    Codec,
    DecodeLimitExceeded,
    DecodeLimits,
    RenderError,
    TranscodeStatus,
    check_declared,
    decompress_for_serving,
    encode_dataset,
    is_uid_shaped,
    read_bounded,
    render_frame,
    transcode_lossless,
)
from imaging.dicom_model import instance_document
from storage import (
    EVERY_SITE,
    AccessScope,
    IndexRepository,
    InstanceQuery,
    InstanceSummary,
    IntegrityError,
    ObjectNotFound,
    ObjectStore,
    QueryRetrieve,
    instance_metadata_key,
    series_metadata_key,
)
from web_viewer_api.dicomweb.multipart import (
    ANY_TRANSFER_SYNTAX,
    EXPLICIT_VR_LITTLE_ENDIAN,
    MediaRange,
    parse_accept,
)
from web_viewer_api.dicomweb.parameters import check_quality, check_viewport, check_window
from web_viewer_api.dicomweb.rendering import RenderedCache, RenderLimits
from web_viewer_api.loop_reads import StreamedPart, open_stored

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
_LOSSLESS_TARGETS = {
    "1.2.840.10008.1.2.4.80": Codec.JPEG_LS,
    "1.2.840.10008.1.2.4.90": Codec.JPEG_2000,
    "1.2.840.10008.1.2.4.201": Codec.HTJ2K,
}
#: PS3.18 Table 8.7.3-5: media types of compressed frames.
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
MAX_LIMIT = 100_000


class WadoError(Exception):
    """Base of retrieval errors."""


class NotFoundError(WadoError):
    """No such study, series, instance or frame (in this scope)."""


class NotAcceptableError(WadoError):
    """The Accept header asks for a representation this server cannot produce."""


class BadRequestError(WadoError):
    """A malformed UID, frame list or query parameter."""


class NotDecodedError(NotAcceptableError):
    """The representation asked for means decoding more than the decode limits allow (the
    stored one can still be retrieved)."""

    def __init__(self, exc: DecodeLimitExceeded) -> None:
        super().__init__(f"not decoded: {exc}; retrieve it as stored (transfer-syntax=*)")


def check_uid(value: str, what: str) -> str:
    if not is_uid_shaped(value):
        raise BadRequestError(f"{what} is not a valid UID")
    return value


# Negotiation ----------------------------------------------------------------------------
@dataclass(frozen=True)
class InstanceRepresentation:
    """How a retrieval sends its instances: in which transfer syntax, and whether as one
    application/dicom body (single part) or as parts of multipart/related."""

    transfer_syntax: str
    single_part: bool = False


def _acceptable_syntax(media: MediaRange) -> str | None:
    """The transfer syntax a media range asks for, if this server can produce it."""
    syntax = str(media.params.get("transfer-syntax", EXPLICIT_VR_LITTLE_ENDIAN))
    if syntax == ANY_TRANSFER_SYNTAX or syntax in (
        EXPLICIT_VR_LITTLE_ENDIAN,
        IMPLICIT_VR_LITTLE_ENDIAN,
        *_LOSSLESS_TARGETS,
    ):
        return syntax
    return None


def negotiate_instance_representation(
    accept: str | None, *, instance_resource: bool
) -> InstanceRepresentation:
    """The representation of a DICOM retrieval (PS3.18 §8.7.3, §10.4.4), from the media
    ranges of `accept`, best first: `application/dicom` names a single part, allowed for an
    Instance Resource only (for a study or series it is ignored, as the standard says);
    `multipart/related; type="application/dicom"`, `multipart/*` or `*/*` name parts.
    NotAcceptableError when no range remains that this server can produce."""
    for media in parse_accept(accept):
        if media.media_type == "application/dicom":
            syntax = _acceptable_syntax(media) if instance_resource else None
            if syntax is not None:
                return InstanceRepresentation(syntax, single_part=True)
        elif media.media_type in ("*/*", "multipart/*"):
            syntax = _acceptable_syntax(media)  # a parameter that is no syntax of ours: 406
            if syntax is not None:
                return InstanceRepresentation(syntax)
        elif media.media_type == "multipart/related":
            if media.params.get("type", "application/dicom") not in (
                "application/dicom",
                "application/*",
                "*/*",
            ):
                continue
            syntax = _acceptable_syntax(media)
            if syntax is not None:
                return InstanceRepresentation(syntax)
    raise NotAcceptableError(
        'no acceptable representation: use multipart/related; type="application/dicom" with '
        "transfer-syntax=* or a lossless one"
        + (
            ", or application/dicom for this instance"
            if instance_resource
            else " (application/dicom names a single instance only)"
        )
    )


def convert_instance(
    body: bytes, target: str, limits: DecodeLimits = DEFAULT_DECODE_LIMITS
) -> tuple[bytes, str]:
    """The stored instance in the target syntax (stored bytes when they already are);
    NotDecodedError when that means decoding more than `limits` allow."""
    if target == ANY_TRANSFER_SYNTAX:
        return body, _stored_syntax(body)
    try:
        return _convert(body, target, limits)
    except DecodeLimitExceeded as exc:
        raise NotDecodedError(exc) from exc


def _convert(body: bytes, target: str, limits: DecodeLimits) -> tuple[bytes, str]:
    dataset = read_bounded(body, limits)
    current = str(dataset.file_meta.TransferSyntaxUID)
    if current == target:
        return body, current
    if UID(current).is_compressed:
        if "PixelData" not in dataset:
            raise NotAcceptableError("cannot change the transfer syntax of this instance")
        try:
            decompress_for_serving(dataset, limits)
        except DecodeLimitExceeded:
            raise
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            raise NotAcceptableError(f"cannot decode the stored pixel data: {exc}") from exc
    if target in _LOSSLESS_TARGETS:
        outcome = transcode_lossless(dataset, _LOSSLESS_TARGETS[target], limits)
        if outcome.status is not TranscodeStatus.COMPRESSED:
            raise NotAcceptableError(f"cannot encode this instance in {target}")
        return encode_dataset(dataset), target
    if target == IMPLICIT_VR_LITTLE_ENDIAN:
        dataset.file_meta.TransferSyntaxUID = UID(IMPLICIT_VR_LITTLE_ENDIAN)
        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True, implicit_vr=True, little_endian=True)
        return buffer.getvalue(), target
    return encode_dataset(dataset), str(dataset.file_meta.TransferSyntaxUID)


def _stored_syntax(body: bytes) -> str:
    header = pydicom.dcmread(BytesIO(body), stop_before_pixels=True, specific_tags=[0x00080018])
    return str(header.file_meta.TransferSyntaxUID)


# Lookup ---------------------------------------------------------------------------------
@dataclass
class Wado:
    """Retrieval over one index and store; `scope` limits what a share or a site's key sees
    (outside it: 404, as if missing)."""

    index: IndexRepository
    store: ObjectStore
    scope: AccessScope = EVERY_SITE
    #: Largest decoded pixel data an instance may declare to be decoded for a client.
    limits: DecodeLimits = DEFAULT_DECODE_LIMITS

    def instances(
        self, study: str, series: str | None = None, sop: str | None = None
    ) -> list[InstanceSummary]:
        check_uid(study, "StudyInstanceUID")
        if series:
            check_uid(series, "SeriesInstanceUID")
        if sop:
            check_uid(sop, "SOPInstanceUID")
        found = QueryRetrieve(self.index).retrieve_instances(
            self.scope, [study], series, (sop,) if sop else (), limit=MAX_LIMIT
        )
        if not found:
            raise NotFoundError("not found")
        return found

    def instance_parts(
        self, instances: list[InstanceSummary], target: str
    ) -> Iterator[StreamedPart]:
        """The instances as parts of a WADO-RS answer, in `target` syntax. One already in
        it (or any syntax asked) goes out as stored; from a store of local files it is only
        opened here, and read as it is sent (`loop_reads.multipart_body`)."""
        for instance in instances:
            # The index records the stored object's syntax; parsing each object to learn it
            # again cost 0.33 ms per 512x512 CT, 17 ms of a 50-slice series. An object whose
            # size is not the indexed one (stored again since, the index not yet told) is
            # parsed after all.
            as_stored = target in (ANY_TRANSFER_SYNTAX, instance.transfer_syntax_uid)
            try:
                opened = (
                    open_stored(self.store, instance.object_key, instance.size_bytes)
                    if as_stored
                    else None
                )
                body = opened if opened is not None else self.store.get(instance.object_key)
            except ObjectNotFound:
                continue  # indexed but gone: reindex will tell; never a broken part
            if isinstance(body, bytes) and not (as_stored and len(body) == instance.size_bytes):
                try:
                    body, syntax = convert_instance(body, target, self.limits)
                except (InvalidDicomError, EOFError) as exc:  # a damaged object: the store's fault
                    raise IntegrityError(
                        f"stored object {instance.object_key!r} is not DICOM"
                    ) from exc
                yield (f"application/dicom; transfer-syntax={syntax}", body, {})
            else:
                yield (
                    f"application/dicom; transfer-syntax={instance.transfer_syntax_uid}",
                    body,
                    {},
                )

    def metadata(self, instances: list[InstanceSummary], base_url: str) -> list[dict[str, Any]]:
        """DICOM JSON of the instances: one object read per series when the series'
        metadata.json (written at study completion) covers exactly these instances, else
        the per-instance JSON objects written at ingest."""
        documents: list[dict[str, Any]] = []
        by_series: dict[tuple[str, str], list[InstanceSummary]] = {}
        for instance in instances:
            by_series.setdefault(
                (instance.study_instance_uid, instance.series_instance_uid), []
            ).append(instance)
        for (study, series), members in by_series.items():
            documents.extend(self._series_metadata(study, series, members, base_url))
        return documents

    def _series_metadata(
        self, study: str, series: str, members: list[InstanceSummary], base_url: str
    ) -> list[dict[str, Any]]:
        wanted = {m.sop_instance_uid for m in members}
        try:
            whole = json.loads(self.store.get(series_metadata_key(study, series)))
            present = {d.get("00080018", {}).get("Value", [""])[0] for d in whole}
            if wanted <= present:
                return [
                    _absolute_bulk_uris(d, base_url)
                    for d in whole
                    if d.get("00080018", {}).get("Value", [""])[0] in wanted
                ]
        except (ObjectNotFound, ValueError):
            pass
        documents = []
        for instance in members:
            key = instance_metadata_key(
                instance.study_instance_uid, instance.series_instance_uid, instance.sop_instance_uid
            )
            try:
                document = json.loads(self.store.get(key))
            except ObjectNotFound:
                header = pydicom.dcmread(
                    BytesIO(self.store.get(instance.object_key)), stop_before_pixels=True
                )
                document = instance_document(
                    header,
                    instance.study_instance_uid,
                    instance.series_instance_uid,
                    instance.sop_instance_uid,
                )
            documents.append(_absolute_bulk_uris(document, base_url))
        return documents

    def instance_json(self, instance: InstanceSummary) -> dict[str, Any] | None:
        """The stored DICOM JSON of one instance (None when it is missing)."""
        key = instance_metadata_key(
            instance.study_instance_uid, instance.series_instance_uid, instance.sop_instance_uid
        )
        try:
            document: dict[str, Any] = json.loads(self.store.get(key))
            return document
        except (ObjectNotFound, ValueError):
            return None

    def representative(self, study: str, series: str | None = None) -> dict[str, Any] | None:
        """DICOM JSON of the first instance of a study or series (for includefield)."""
        found = QueryRetrieve(self.index).search_for_instances(
            self.scope, InstanceQuery(study_instance_uid=study, series_instance_uid=series, limit=1)
        )
        return self.instance_json(found[0]) if found else None

    def dataset(self, instance: InstanceSummary, *, decoded: bool = True) -> Dataset:
        """The stored instance, read (deflate bounded by `limits`). With `decoded` (it is
        read to be decoded) its declared size is checked too: NotDecodedError above it."""
        try:
            return read_bounded(self.store.get(instance.object_key), self.limits, check=decoded)
        except DecodeLimitExceeded as exc:
            raise NotDecodedError(exc) from exc


def _absolute_bulk_uris(document: Any, base_url: str) -> Any:
    if isinstance(document, dict):
        result = {}
        for key, value in document.items():
            if key == "BulkDataURI" and isinstance(value, str) and not value.startswith("http"):
                result[key] = f"{base_url}/{value}"
            else:
                result[key] = _absolute_bulk_uris(value, base_url)
        return result
    if isinstance(document, list):
        return [_absolute_bulk_uris(v, base_url) for v in document]
    return document


# Frames -------------------------------------------------------------------------------
def parse_frame_list(text: str) -> list[int]:
    """The frame numbers of a `{frames}` path segment, in the order asked. PS3.18 (Retrieve
    Frames) makes it "one or more non duplicate frame numbers", in any order: a number
    listed twice is a malformed request (400), not a frame to send twice, so an answer
    never holds more than the instance's frames once. A number above the instance's frame
    count is a 404 (`frame_parts`)."""
    try:
        numbers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:  # also a number of more digits than int() takes
        raise BadRequestError("frame list must be comma-separated frame numbers") from exc
    if not numbers or any(n < 1 for n in numbers):
        raise BadRequestError("frame numbers start at 1")
    if len(set(numbers)) != len(numbers):
        raise BadRequestError(
            "the frame list names a frame more than once (PS3.18: a list of "
            "non-duplicate frame numbers)"
        )
    return numbers


def frame_parts(
    dataset: Dataset,
    numbers: list[int],
    accept: str | None,
    limits: DecodeLimits = DEFAULT_DECODE_LIMITS,
) -> tuple[str, list[tuple[str, bytes, dict[str, str]]]]:
    """(part media type, parts) for the requested frames: uncompressed octet-stream by
    default (NotDecodedError above `limits`), the stored compressed bitstream when the
    Accept header allows it."""
    count = int(dataset.get("NumberOfFrames", 1) or 1)
    if any(n > count for n in numbers):
        raise NotFoundError(f"the instance has {count} frames")
    stored = str(dataset.file_meta.TransferSyntaxUID)
    compressed_type = FRAME_MEDIA_TYPES.get(stored)
    for media in parse_accept(accept):
        part = media.params.get(
            "type",
            media.media_type
            if media.media_type != "multipart/related"
            else "application/octet-stream",
        )
        syntax = media.params.get("transfer-syntax")
        if compressed_type and (
            part == compressed_type or (part in ("*/*", "*") and syntax == "*") or syntax == stored
        ):
            frames = list(generate_frames(dataset.PixelData, number_of_frames=count))
            return compressed_type, [
                (f"{compressed_type}; transfer-syntax={stored}", frames[n - 1], {}) for n in numbers
            ]
        if part in ("application/octet-stream", "*/*", "*") and syntax in (
            None,
            EXPLICIT_VR_LITTLE_ENDIAN,
            "*",
        ):
            return "application/octet-stream", [
                ("application/octet-stream", f, {})
                for f in _native_frames(dataset, numbers, limits)
            ]
        target = _LOSSLESS_FRAME_TARGETS.get(part)
        if target is not None and syntax in (None, target):
            return part, [
                (f"{part}; transfer-syntax={target}", f, {})
                for f in _transcoded_frames(dataset, numbers, target, limits)
            ]
    raise NotAcceptableError(
        "frames are available as application/octet-stream"
        + (f", {compressed_type}" if compressed_type else "")
        + " or, re-encoded losslessly, "
        + ", ".join(_LOSSLESS_FRAME_TARGETS)
    )


#: Frame media types served in another lossless syntax than the stored one, re-encoded (and
#: verified) by the worker's transcoder: a client that reads only one codec gets it.
_LOSSLESS_FRAME_TARGETS = {FRAME_MEDIA_TYPES[uid]: uid for uid in _LOSSLESS_TARGETS}


def _transcoded_frames(
    dataset: Dataset, numbers: list[int], target: str, limits: DecodeLimits
) -> list[bytes]:
    """The frames re-encoded in the lossless `target` syntax (the whole instance is; the
    decode limits bound it)."""
    count = int(dataset.get("NumberOfFrames", 1) or 1)
    _decode_in_place(dataset, limits)
    outcome = transcode_lossless(dataset, _LOSSLESS_TARGETS[target], limits)
    if outcome.status is not TranscodeStatus.COMPRESSED:
        raise NotAcceptableError(f"cannot encode these frames in {target}")
    frames = list(generate_frames(dataset.PixelData, number_of_frames=count))
    return [frames[n - 1] for n in numbers]


def _decode_in_place(dataset: Dataset, limits: DecodeLimits) -> None:
    """Native pixels in `dataset`: NotDecodedError above `limits`, NotAcceptableError when
    the stored pixel data cannot be decoded."""
    try:
        check_declared(dataset, limits)
        if UID(str(dataset.file_meta.TransferSyntaxUID)).is_compressed:
            decompress_for_serving(dataset, limits)
    except DecodeLimitExceeded as exc:
        raise NotDecodedError(exc) from exc
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        raise NotAcceptableError(f"cannot decode the stored pixel data: {exc}") from exc


def _native_frames(dataset: Dataset, numbers: list[int], limits: DecodeLimits) -> list[bytes]:
    _decode_in_place(dataset, limits)
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    samples, bits = int(dataset.get("SamplesPerPixel", 1)), int(dataset.BitsAllocated)
    length = rows * columns * samples * bits // 8
    data = bytes(dataset.PixelData)
    return [data[(n - 1) * length : n * length] for n in numbers]


# Rendered -------------------------------------------------------------------------------
#: Largest viewport (each side, pixels) a rendered request may ask for; above it, 400.
#: Size the image is fitted into when the request names no viewport.
DEFAULT_RENDERED_SIZE = 1024
THUMBNAIL_SIZE = 128


class TooLargeToRenderError(WadoError):
    """The instance declares a frame larger than the render limits: refused undecoded."""


@dataclass(frozen=True)
class RenderParameters:
    """A rendered request's parameters, validated: they and the frame determine the image
    (and so key the cache)."""

    media_type: str
    size: int
    window: tuple[float, float] | None
    quality: int


def parse_render_parameters(
    accept: str | None,
    *,
    viewport: str | None,
    window: str | None,
    quality: str | None,
    default_size: int = DEFAULT_RENDERED_SIZE,
) -> RenderParameters:
    """The media type from `accept` (JPEG by default, or PNG; else NotAcceptableError) and
    the query parameters of PS3.18 §8.3.5 (their rules: `parameters.py`): `viewport=vw,vh` (the
    image is fitted into the larger), `window=center,width[,function]` (finite, width > 0),
    `quality` 1-100 (JPEG). BadRequest (400) for anything else, before any pixel is read."""
    media_type = "image/jpeg"
    for media in parse_accept(accept):
        if media.media_type in ("image/png", "image/jpeg"):
            media_type = media.media_type
            break
        if media.media_type in ("*/*", "image/*"):
            break
    else:
        if accept:
            raise NotAcceptableError("rendered resources are image/jpeg or image/png")
    # The rules are parameters.py's (400 with the reason); only valid values are parsed here.
    size = default_size
    if viewport:
        check_viewport(viewport)
        size = max(int(v) for v in viewport.split(",")[:2])
    window_values = None
    if window:
        check_window(window)
        center, width_value = (float(v) for v in window.split(",")[:2])
        window_values = (center, width_value)
    level = 90
    if quality:
        check_quality(quality)
        level = int(quality)
    return RenderParameters(media_type, size, window_values, level)


def check_declared_frame(
    limits: RenderLimits,
    rows: int | None,
    columns: int | None,
    samples: int = 1,
    bits_allocated: int = 8,
) -> None:
    """TooLargeToRenderError when a frame of the declared matrix is over `limits` (unknown
    dimensions pass: the header is checked again before decoding)."""
    if rows and columns:
        reason = limits.refusal(rows, columns, samples, bits_allocated)
        if reason is not None:
            raise TooLargeToRenderError(reason)


def _declared(dataset: Dataset, keyword: str, default: int) -> int:
    try:
        return int(dataset.get(keyword) or default)
    except (TypeError, ValueError):
        return default


def rendered(
    dataset: Dataset,
    parameters: RenderParameters,
    *,
    frame: int | None = None,
    highest_frame: int | None = None,
    limits: RenderLimits | None = None,
) -> bytes:
    """An image of one frame (1-based; None: the middle one) in `parameters.media_type`,
    windowed and fitted to the viewport. Only that frame is decoded, and not at all when the
    header declares a frame over `limits` (TooLargeToRenderError). NotFoundError for a
    missing frame (`frame`, or `highest_frame` of a list) or an instance without
    (decodable) pixel data."""
    count = _declared(dataset, "NumberOfFrames", 1)
    highest = max(frame or 0, highest_frame or 0)
    if highest > count:
        raise NotFoundError(f"no frame {highest}: the instance has {count}")
    check_declared_frame(
        limits or RenderLimits(),
        _declared(dataset, "Rows", 0),
        _declared(dataset, "Columns", 0),
        _declared(dataset, "SamplesPerPixel", 1),
        _declared(dataset, "BitsAllocated", 8),
    )
    if parameters.window is not None:
        dataset.WindowCenter, dataset.WindowWidth = parameters.window
        if "VOILUTSequence" in dataset:
            del dataset.VOILUTSequence
    try:
        image = render_frame(
            dataset, size=parameters.size, frame_index=None if frame is None else frame - 1
        )
    except RenderError as exc:
        raise NotFoundError(str(exc)) from exc
    out = BytesIO()
    if parameters.media_type == "image/png":
        image.save(out, "PNG", optimize=False)
    else:
        image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).save(
            out, "JPEG", quality=parameters.quality
        )
    return out.getvalue()


def render_instance(
    wado: Wado,
    instance: InstanceSummary,
    parameters: RenderParameters,
    *,
    frames: list[int] | None = None,
    limits: RenderLimits,
    cache: RenderedCache | None,
) -> bytes:
    """The rendered image of an instance found in scope, of the middle one of `frames` (each
    of which must exist; none: the instance's middle frame). Refused from its index row
    when it declares a frame over `limits` (nothing read); from `cache` when this image was
    rendered before and the stored object is still there (looked up, not read: an object
    gone is ObjectNotFound, as in a retrieval); else read, rendered and kept in `cache`."""
    check_declared_frame(limits, instance.rows, instance.columns)
    frame = frames[len(frames) // 2] if frames else None
    highest = max(frames) if frames else None
    indexed_count = instance.number_of_frames or (1 if instance.rows else None)
    if highest is not None and indexed_count is not None and highest > indexed_count:
        raise NotFoundError(f"no frame {highest}: the instance has {indexed_count}")
    # The stored object's key and digest: an instance stored again renders afresh.
    key = (instance.object_key, instance.sha256, instance.size_bytes, frame, highest, parameters)
    found = cache.get(key) if cache is not None else None
    if found is not None and wado.store.head(instance.object_key).size == instance.size_bytes:
        return found
    try:
        dataset = wado.dataset(instance)
    except (InvalidDicomError, EOFError) as exc:  # a damaged object: the store's fault
        raise IntegrityError(f"stored object {instance.object_key!r} is not DICOM") from exc
    image = rendered(dataset, parameters, frame=frame, highest_frame=highest, limits=limits)
    if cache is not None:
        cache.put(key, image)
    return image
