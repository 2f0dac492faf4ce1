"""DICOMweb Studies Service routes (PS3.18): QIDO-RS at every level and WADO-RS."""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import gzip
import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from imaging import StoreStatus
from storage import (
    EVERY_SITE,
    AccessScope,
    IndexRepository,
    InstanceQuery,
    InstanceSummary,
    ObjectNotFound,
    QueryRetrieve,
    SeriesQuery,
    SeriesSummary,
    StudyQuery,
    StudySummary,
)
from web_viewer_api.audit import AuditAction, audited
from web_viewer_api.auth import Principal
from web_viewer_api.deps import IndexDep, ReadPrincipal, WritePrincipal, read_inline
from web_viewer_api.dicomweb.multipart import (
    Part,
    StreamedPart,
    as_bytes,
    multipart_body,
    multipart_content_type,
    multipart_stream,
    new_boundary,
    parse_accept,
)
from web_viewer_api.dicomweb.qido import (
    INSTANCE_MATCHING_KEYS,
    SERIES_LEVEL_TAGS,
    SERIES_MATCHING_KEYS,
    STUDY_LEVEL_TAGS,
    ParsedQuery,
    QueryParameterError,
    include_fields,
    instance_query,
    instance_to_dicom_json,
    parse_query,
    parse_study_query,
    series_query,
    series_to_dicom_json,
    study_to_dicom_json,
)
from web_viewer_api.dicomweb.rendering import RenderedCache, RenderLimits
from web_viewer_api.dicomweb.stow import (
    StowRequestError,
    boundary_of,
    json_parts_to_instances,
    receive_parts,
    response_dataset,
    spool_parts,
)
from web_viewer_api.dicomweb.wado import (
    THUMBNAIL_SIZE,
    BadRequestError,
    NotAcceptableError,
    NotFoundError,
    RenderParameters,
    TooLargeToRenderError,
    Wado,
    WadoError,
    check_declared_frame,
    check_uid,
    frame_parts,
    negotiate_instance_representation,
    parse_frame_list,
    parse_render_parameters,
    render_instance,
)
from web_viewer_api.dicomweb.xml import to_native_xml
from web_viewer_api.errors import (
    ApiError,
    BadRequest,
    Forbidden,
    NotAcceptable,
    NotFound,
    TooLargeToRender,
    Unavailable,
    api_error_response,
    error_body,
)

router = APIRouter(prefix="/dicom-web", tags=["DICOMweb"])
_Found = TypeVar("_Found")
_Query = TypeVar("_Query", StudyQuery, SeriesQuery, InstanceQuery)
_Part = TypeVar("_Part")

DICOM_JSON = "application/dicom+json"
_ACCEPTABLE_JSON = {DICOM_JSON, "application/json", "*/*", "application/*"}
_IMMUTABLE = "private, max-age=3600"


def _wants_xml(request: Request) -> bool:
    """True when the client prefers multipart/related; type="application/dicom+xml"."""
    for media in parse_accept(request.headers.get("accept")):
        if media.media_type in _ACCEPTABLE_JSON:
            return False
        if (media.media_type == "multipart/related"
                and media.params.get("type", "").lower() == "application/dicom+xml"):
            return True
    return False


def _require_json(request: Request) -> None:
    if _wants_xml(request) or any(media.media_type in _ACCEPTABLE_JSON
                                  for media in parse_accept(request.headers.get("accept"))):
        return
    raise NotAcceptable("this resource is application/dicom+json or "
                        'multipart/related; type="application/dicom+xml"')


def _scope(request: Request) -> AccessScope:
    principal: Principal | None = getattr(request.state, "principal", None)
    return principal.scope if principal is not None else EVERY_SITE


def _wado(request: Request, index: IndexDep) -> Wado:
    return Wado(index, request.app.state.store, _scope(request),
                request.app.state.config.decode_limits)


def _base(request: Request) -> str:
    """This DICOMweb root's absolute URL (a share's own root under /s/{token})."""
    public = request.app.state.config.public_url
    root = public.rstrip("/") if public else str(request.base_url).rstrip("/")
    share_token = request.path_params.get("share_token")
    return root + (f"/s/{share_token}" if share_token else "") + "/dicom-web"


def _json(body: Any, headers: dict[str, str] | None = None,
          request: Request | None = None) -> Response:
    """DICOM JSON (or Native DICOM Model XML parts when the client prefers them); JSON is
    gzip-compressed when the client accepts it and it is worth it."""
    if request is not None and _wants_xml(request):
        boundary = new_boundary()
        parts: list[tuple[str, bytes, dict[str, str]]] = [
            ("application/dicom+xml", to_native_xml(document), {}) for document in body]
        return Response(b"".join(multipart_stream(parts, boundary)),
                        headers={**(headers or {}), "Vary": "Accept, Accept-Encoding"},
                        media_type=multipart_content_type("application/dicom+xml", boundary))
    payload = json_bytes(body)
    # JSON or XML, gzip or not: both depend on the request's headers.
    extra = {**(headers or {}), "Vary": "Accept, Accept-Encoding"}
    if (request is not None and len(payload) > 1024
            and "gzip" in request.headers.get("accept-encoding", "").lower()):
        payload = gzip.compress(payload, compresslevel=5)
        extra["Content-Encoding"] = "gzip"
    return Response(payload, media_type=DICOM_JSON, headers=extra)


#: A UTF-16 surrogate alone (from a value decoded with surrogateescape): not UTF-8 text.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def json_bytes(body: Any) -> bytes:
    """`body` as UTF-8 JSON that any strict parser reads: a lone surrogate, which UTF-8
    cannot carry, becomes U+FFFD."""
    text = json.dumps(body, ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text).encode()


def _etag(instances: list[InstanceSummary], variant: str) -> str:
    """A strong validator of immutable content: the stored objects' SHA-256 and the variant."""
    digest = hashlib.sha256(variant.encode())
    for instance in instances:
        digest.update(instance.sha256.encode())
    return f'"{digest.hexdigest()[:32]}"'


def _not_modified(request: Request, etag: str, last_modified: str | None) -> Response | None:
    if etag in {t.strip() for t in request.headers.get("if-none-match", "").split(",")}:
        headers = {"ETag": etag, "Cache-Control": _IMMUTABLE}
        if last_modified:
            headers["Last-Modified"] = last_modified
        return Response(status_code=304, headers=headers)
    return None


def _last_modified(instances: list[InstanceSummary]) -> str | None:
    moments = [i.updated_at for i in instances if i.updated_at is not None]
    if not moments:
        return None
    latest = max(m if m.tzinfo else m.replace(tzinfo=dt.UTC) for m in moments)
    return email.utils.format_datetime(latest.astimezone(dt.UTC), usegmt=True)


def _warnings(parsed: Any, returned: int) -> dict[str, str]:
    """Warning header values (PS3.18 §8.6): ignored keys, no fuzzy matching, truncation."""
    warnings = []
    if parsed.ignored:
        warnings.append(f'299 dicom-gateway "unsupported matching keys ignored: {", ".join(parsed.ignored)}"')
    if parsed.fuzzy_requested:
        warnings.append('299 dicom-gateway "fuzzymatching is not supported"')
    limit = int(parsed.limit if isinstance(parsed, ParsedQuery) else parsed.query.limit)
    if returned >= limit:
        warnings.append('299 dicom-gateway "There are additional results that can be requested"')
    return {"Warning": ", ".join(warnings)} if warnings else {}


# QIDO-RS ---------------------------------------------------------------------------------
#: Searches answered on the event loop when the index allows it (storage.index.bounded):
#: pages up to this size, without includefield (which reads stored objects), in JSON (the
#: XML conversion costs 0.4 ms per result).
INLINE_LIMIT = 100
#: Results whose answer (DICOM JSON, gzip) is written on the event loop; more go to a thread.
INLINE_ANSWER = 20


def _form(query: StudyQuery | SeriesQuery | InstanceQuery, scope: AccessScope) -> tuple[Any, ...]:
    """What a search matches on (not the values), whether with wildcards, and its scope's
    restrictions: searches of one form usually cost about the same."""
    used: list[str] = []
    wildcard = False
    for item in dataclasses.fields(query):
        value = getattr(query, item.name)
        if item.name in ("limit", "offset", "scope") or value in (None, "", (), False):
            continue
        used.append(item.name)
        wildcard = wildcard or any(c in str(value) for c in "*?")
    return (type(query).__name__, *used, wildcard, scope.shape)


async def _search(request: Request, index: IndexRepository, include: frozenset[str],
                  query: _Query, verb: Callable[[QueryRetrieve, AccessScope, _Query], list[_Found]],
                  answer: Callable[[list[_Found]], Response]) -> Response:
    """`answer(verb(query))` in the caller's scope, on the event loop when the search fits
    the inline time budget, else in a worker thread: there a database that does not answer,
    or a pool with no free connection, stalls this request only."""
    scope = _scope(request)

    def search(repository: IndexRepository) -> list[_Found]:
        return verb(QueryRetrieve(repository), scope, query)

    inline = not include and query.limit <= INLINE_LIMIT and not _wants_xml(request)
    quick = read_inline(request) if inline else None
    if quick is not None:
        found = quick.run(search, _form(query, scope))  # a form that overran goes to the thread
        if found is not None:
            if len(found) <= INLINE_ANSWER:
                return answer(found)
            return await run_in_threadpool(lambda: answer(found))
    return await run_in_threadpool(lambda: answer(search(index)))


@router.get("/studies", summary="QIDO-RS: search for studies")
@audited(AuditAction.DICOMWEB_SEARCH)
async def search_for_studies(request: Request, _principal: ReadPrincipal, index: IndexDep) -> Response:
    """Match studies on the required keys of PS3.18 Table 10.6.1-5: StudyDate and
    StudyTime (ranges), AccessionNumber, StudyID, PatientID (wildcards), PatientName and
    ReferringPhysicianName (fuzzy with `fuzzymatching=true`), StudyInstanceUID (list),
    ModalitiesInStudy; `limit`/`offset` page the results. No match is `200 []` (CP-2473)."""
    _require_json(request)
    parsed = parse_study_query(request.query_params.multi_items())
    query = parsed.query

    def answer(studies: list[StudySummary]) -> Response:
        wado = _wado(request, index)
        body = [include_fields(study_to_dicom_json(s, _base(request)),
                               wado.representative(s.study_instance_uid) if parsed.include else None,
                               parsed.include, STUDY_LEVEL_TAGS)
                for s in studies]
        return _json(body, _warnings(parsed, len(body)) if parsed.ignored or parsed.fuzzy_requested
                     or len(body) >= query.limit else {}, request)

    return await _search(request, index, parsed.include, query,
                         QueryRetrieve.search_for_studies, answer)


async def _series(request: Request, index: IndexRepository, study: str | None) -> Response:
    _require_json(request)
    parsed = parse_query(request.query_params.multi_items(), SERIES_MATCHING_KEYS)
    study = study or parsed.values.get("StudyInstanceUID")
    if study:
        check_uid(study, "StudyInstanceUID")
    query = series_query(parsed, study)

    def answer(series: list[SeriesSummary]) -> Response:
        wado = _wado(request, index)
        body = [include_fields(series_to_dicom_json(s, _base(request)),
                               wado.representative(s.study_instance_uid, s.series_instance_uid)
                               if parsed.include else None,
                               parsed.include, STUDY_LEVEL_TAGS | SERIES_LEVEL_TAGS)
                for s in series]
        return _json(body, _warnings(parsed, len(body)), request)

    return await _search(request, index, parsed.include, query,
                         QueryRetrieve.search_for_series, answer)


@router.get("/series", summary="QIDO-RS: search for series")
@audited(AuditAction.DICOMWEB_SEARCH)
async def search_for_all_series(request: Request, _principal: ReadPrincipal, index: IndexDep) -> Response:
    return await _series(request, index, None)


@router.get("/studies/{study}/series", summary="QIDO-RS: search for a study's series")
@audited(AuditAction.DICOMWEB_SEARCH)
async def search_for_series(study: str, request: Request, _principal: ReadPrincipal,
                            index: IndexDep) -> Response:
    return await _series(request, index, study)


async def _instances(request: Request, index: IndexRepository, study: str | None,
                     series: str | None) -> Response:
    _require_json(request)
    parsed = parse_query(request.query_params.multi_items(), INSTANCE_MATCHING_KEYS)
    study = study or parsed.values.get("StudyInstanceUID")
    series = series or parsed.values.get("SeriesInstanceUID")
    for value, what in ((study, "StudyInstanceUID"), (series, "SeriesInstanceUID")):
        if value:
            check_uid(value, what)
    query = instance_query(parsed, study, series)

    def answer(found: list[InstanceSummary]) -> Response:
        wado = _wado(request, index)
        body = [include_fields(instance_to_dicom_json(i, _base(request)),
                               wado.instance_json(i) if parsed.include else None, parsed.include, None)
                for i in found]
        return _json(body, _warnings(parsed, len(body)), request)

    return await _search(request, index, parsed.include, query,
                         QueryRetrieve.search_for_instances, answer)


@router.get("/instances", summary="QIDO-RS: search for instances")
@audited(AuditAction.DICOMWEB_SEARCH)
async def search_for_all_instances(request: Request, _principal: ReadPrincipal,
                                   index: IndexDep) -> Response:
    return await _instances(request, index, None, None)


@router.get("/studies/{study}/instances", summary="QIDO-RS: search for a study's instances")
@audited(AuditAction.DICOMWEB_SEARCH)
async def search_for_study_instances(study: str, request: Request, _principal: ReadPrincipal,
                                     index: IndexDep) -> Response:
    return await _instances(request, index, study, None)


@router.get("/studies/{study}/series/{series}/instances", summary="QIDO-RS: search for a series' instances")
@audited(AuditAction.DICOMWEB_SEARCH)
async def search_for_instances(study: str, series: str, request: Request, _principal: ReadPrincipal,
                               index: IndexDep) -> Response:
    return await _instances(request, index, study, series)


# WADO-RS ---------------------------------------------------------------------------------
def _retrieve(request: Request, index: IndexDep, study: str, series: str | None = None,
              sop: str | None = None) -> Response:
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is not None and principal.share is not None and not principal.share.allow_download:
        raise Forbidden("this share allows viewing, not downloading whole instances")
    wado = _wado(request, index)
    representation = negotiate_instance_representation(request.headers.get("accept"),
                                                       instance_resource=sop is not None)
    syntax = representation.transfer_syntax
    instances = wado.instances(study, series, sop)
    # The study is indexed (a de-identified UID): the trail may name it even if the stream
    # fails later (a failed request's own path is not kept, see web_viewer_api.audit).
    request.state.audit = {**(getattr(request.state, "audit", None) or {}), "study": study}
    variant = f"dicom:{syntax}" + (":single" if representation.single_part else "")
    etag, modified = _etag(instances, variant), _last_modified(instances)
    cached = _not_modified(request, etag, modified)
    if cached is not None:
        return cached
    headers = {"ETag": etag}
    if modified:
        headers["Last-Modified"] = modified
    parts = wado.instance_parts(instances, syntax)
    # The first object is read before the answer starts: an unreachable store is a 503 the
    # client can act on, not a 200 cut off after its headers.
    first = next(parts, None)
    if first is None:  # indexed, but no object left to send: not an empty 200
        raise NotFoundError("not found")
    content_type, body, extra = first
    first = (content_type, as_bytes(body), extra)
    if representation.single_part:  # one instance (PS3.18 §8.7.3): its Part 10 bytes alone
        return Response(first[1], media_type=content_type,
                        headers={"Cache-Control": _IMMUTABLE, "Vary": "Accept", **headers})
    return _multipart_response("application/dicom",
                               itertools.chain((first,), _while_shared(request, parts)), headers)


@router.get("/studies/{study}", summary="WADO-RS: retrieve a study")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_study(study: str, request: Request, _principal: ReadPrincipal, index: IndexDep) -> Response:
    return _retrieve(request, index, study)


@router.get("/studies/{study}/series/{series}", summary="WADO-RS: retrieve a series")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_series(study: str, series: str, request: Request, _principal: ReadPrincipal,
                    index: IndexDep) -> Response:
    return _retrieve(request, index, study, series)


@router.get("/studies/{study}/series/{series}/instances/{sop}", summary="WADO-RS: retrieve an instance")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_instance(study: str, series: str, sop: str, request: Request,
                      _principal: ReadPrincipal, index: IndexDep) -> Response:
    return _retrieve(request, index, study, series, sop)


def _metadata(request: Request, index: IndexDep, study: str, series: str | None = None,
              sop: str | None = None) -> Response:
    _require_json(request)
    wado = _wado(request, index)
    instances = wado.instances(study, series, sop)
    etag, modified = _etag(instances, f"metadata:{_base(request)}"), _last_modified(instances)
    cached = _not_modified(request, etag, modified)
    if cached is not None:
        return cached
    headers = {"Cache-Control": _IMMUTABLE, "ETag": etag}
    if modified:
        headers["Last-Modified"] = modified
    return _json(wado.metadata(instances, _base(request)), headers, request)


@router.get("/studies/{study}/metadata", summary="WADO-RS: study metadata")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_study_metadata(study: str, request: Request, _principal: ReadPrincipal,
                            index: IndexDep) -> Response:
    return _metadata(request, index, study)


@router.get("/studies/{study}/series/{series}/metadata", summary="WADO-RS: series metadata")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_series_metadata(study: str, series: str, request: Request, _principal: ReadPrincipal,
                             index: IndexDep) -> Response:
    return _metadata(request, index, study, series)


@router.get("/studies/{study}/series/{series}/instances/{sop}/metadata",
            summary="WADO-RS: instance metadata")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_instance_metadata(study: str, series: str, sop: str, request: Request,
                               _principal: ReadPrincipal, index: IndexDep) -> Response:
    return _metadata(request, index, study, series, sop)


def _frames(request: Request, index: IndexDep, study: str, series: str, sop: str,
            frames: str) -> Response:
    numbers = parse_frame_list(frames)
    wado = _wado(request, index)
    [instance] = wado.instances(study, series, sop)
    dataset = wado.dataset(instance, decoded=False)  # compressed frames go out undecoded
    if "PixelData" not in dataset:
        raise NotFoundError("no pixel data")
    part_type, parts = frame_parts(dataset, numbers, request.headers.get("accept"), wado.limits)
    return _multipart_response(part_type, parts)


def _while_shared(request: Request, parts: Iterator[_Part]) -> Iterator[_Part]:
    """The parts of an answer through a share link stop soon after the share is revoked
    (`ShareGate.while_live`): a long retrieval does not outlive the sender's decision."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None or principal.share is None:
        return parts
    return request.app.state.share_gate.while_live(  # type: ignore[no-any-return]
        principal.share.share_id, parts, request.app.state.config.share_liveness_seconds)


def _multipart_response(part_type: str, parts: Iterable[StreamedPart],
                        headers: dict[str, str] | None = None) -> StreamingResponse:
    """A streamed multipart/related answer of immutable content."""
    boundary = new_boundary()
    return StreamingResponse(multipart_body(parts, boundary),
                             media_type=multipart_content_type(part_type, boundary),
                             headers={"Cache-Control": _IMMUTABLE, "Vary": "Accept", **(headers or {})})


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}",
            summary="WADO-RS: retrieve frames")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_frames(study: str, series: str, sop: str, frames: str, request: Request,
                    _principal: ReadPrincipal, index: IndexDep) -> Response:
    return _frames(request, index, study, series, sop, frames)


def _bulkdata(request: Request, index: IndexDep, study: str, series: str, sop: str,
              tag: str) -> Response:
    try:
        number = int(tag, 16) if len(tag) == 8 else -1
        if number < 0:
            raise ValueError(tag)
    except ValueError as exc:
        raise BadRequestError("bulk data is addressed by an 8-digit hexadecimal tag") from exc
    wado = _wado(request, index)
    [instance] = wado.instances(study, series, sop)
    dataset = wado.dataset(instance, decoded=False)
    if number not in dataset:
        raise NotFoundError("no such bulk data")
    if number == 0x7FE00010:
        numbers = list(range(1, int(dataset.get("NumberOfFrames", 1) or 1) + 1))
        part_type, parts = frame_parts(dataset, numbers, request.headers.get("accept"),
                                       wado.limits)
        return _multipart_response(part_type, parts)
    value = dataset[number].value
    if not isinstance(value, bytes | bytearray):
        raise NotFoundError("this attribute is not bulk data")
    return _multipart_response("application/octet-stream",
                               [("application/octet-stream", bytes(value), {})])


@router.get("/studies/{study}/series/{series}/instances/{sop}/bulkdata/{tag}",
            summary="WADO-RS: bulk data of an instance (the BulkDataURIs of its metadata)")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_bulkdata(study: str, series: str, sop: str, tag: str, request: Request,
                      _principal: ReadPrincipal, index: IndexDep) -> Response:
    return _bulkdata(request, index, study, series, sop, tag)


def _render_setup(request: Request, accept: str | None,
                  thumbnail: bool = False) -> tuple[RenderParameters, RenderLimits, RenderedCache | None]:
    """The request's validated parameters (400/406 before anything is read), the render
    limits and the rendered-image cache."""
    params = request.query_params
    parameters = parse_render_parameters(
        accept, viewport=params.get("viewport") or (
            f"{THUMBNAIL_SIZE},{THUMBNAIL_SIZE}" if thumbnail else None),
        window=params.get("window"), quality=params.get("quality"))
    return parameters, request.app.state.config.rendering, request.app.state.rendered_cache


def _rendered(request: Request, index: IndexDep, study: str, series: str, sop: str,
              frames: list[int] | None, thumbnail: bool = False) -> Response:
    """One image of the instance: of the middle one of `frames` (each of which must exist)."""
    parameters, limits, cache = _render_setup(request, request.headers.get("accept"), thumbnail)
    wado = _wado(request, index)
    [instance] = wado.instances(study, series, sop)
    image = render_instance(wado, instance, parameters, frames=frames, limits=limits, cache=cache)
    # The representation depends on Accept: caches must not hand a PNG to a JPEG request.
    return Response(image, media_type=parameters.media_type,
                    headers={"Cache-Control": _IMMUTABLE, "Vary": "Accept"})


@router.get("/studies/{study}/series/{series}/instances/{sop}/rendered",
            summary="WADO-RS: rendered instance")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_rendered_instance(study: str, series: str, sop: str, request: Request,
                               _principal: ReadPrincipal, index: IndexDep) -> Response:
    return _rendered(request, index, study, series, sop, None)


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frame}/rendered",
            summary="WADO-RS: rendered frame")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_rendered_frame(study: str, series: str, sop: str, frame: str, request: Request,
                            _principal: ReadPrincipal, index: IndexDep) -> Response:
    def call() -> Response:
        numbers = parse_frame_list(frame)
        if len(numbers) != 1:
            raise BadRequestError("one frame per rendered request")
        return _rendered(request, index, study, series, sop, numbers)
    return call()


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}/thumbnail",
            summary="WADO-RS: frame thumbnail")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_frame_thumbnail(study: str, series: str, sop: str, frames: str, request: Request,
                             _principal: ReadPrincipal, index: IndexDep) -> Response:
    """A thumbnail representative of the listed frames (PS3.18 §10.4, Sup 203): the
    middle one of the list, as the series thumbnail takes its middle instance."""
    def call() -> Response:
        return _rendered(request, index, study, series, sop, parse_frame_list(frames),
                         thumbnail=True)
    return call()


@router.get("/studies/{study}/series/{series}/instances/{sop}/thumbnail",
            summary="WADO-RS: instance thumbnail")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_instance_thumbnail(study: str, series: str, sop: str, request: Request,
                                _principal: ReadPrincipal, index: IndexDep) -> Response:
    return _rendered(request, index, study, series, sop, None, thumbnail=True)


def _rendered_part_type(accept: str | None) -> str:
    """The image type of the parts of a rendered study or series: `multipart/related;
    type="image/jpeg"` or `type="image/png"`; a bare image type or `*/*` is taken to name
    the parts (the answer's Content-Type says it is multipart)."""
    for media in parse_accept(accept):
        if media.media_type == "multipart/related":
            part = media.params.get("type", "image/jpeg").lower()
            if part in ("image/jpeg", "image/png"):
                return part
        elif media.media_type in ("image/jpeg", "image/png"):
            return media.media_type
        elif media.media_type in ("*/*", "image/*", "multipart/*"):
            return "image/jpeg"
    raise NotAcceptableError('rendered studies and series are multipart/related; type="image/jpeg" '
                             'or type="image/png"')


def _rendered_many(request: Request, index: IndexDep, study: str, series: str | None) -> Response:
    """Every image instance of the study or series, rendered like its instance resource
    (one image each, `window`/`viewport`/`quality` applied), as one multipart answer."""
    part_type = _rendered_part_type(request.headers.get("accept"))
    parameters, limits, cache = _render_setup(request, part_type)
    wado = _wado(request, index)
    instances = _images(wado, study, series)
    for instance in instances:  # one frame too large to render: 422 before the answer starts
        check_declared_frame(limits, instance.rows, instance.columns)
    base = _base(request)

    def parts() -> Iterator[Part]:
        for instance in instances:
            try:
                image = render_instance(wado, instance, parameters, limits=limits, cache=cache)
            except ObjectNotFound:
                continue  # indexed but gone, as in a retrieval: never a broken part
            yield parameters.media_type, image, {"Content-Location": (
                f"{base}/studies/{instance.study_instance_uid}/series/{instance.series_instance_uid}"
                f"/instances/{instance.sop_instance_uid}/rendered")}

    rendering = parts()
    first = next(rendering, None)  # the first image's failure is an error answer, not a cut one
    if first is None:
        raise NotFoundError("not found")
    return _multipart_response(part_type, itertools.chain((first,), _while_shared(request, rendering)))


@router.get("/studies/{study}/series/{series}/rendered", summary="WADO-RS: rendered series")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_rendered_series(study: str, series: str, request: Request,
                             _principal: ReadPrincipal, index: IndexDep) -> Response:
    return _rendered_many(request, index, study, series)


@router.get("/studies/{study}/rendered", summary="WADO-RS: rendered study")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_rendered_study(study: str, request: Request, _principal: ReadPrincipal,
                            index: IndexDep) -> Response:
    return _rendered_many(request, index, study, None)


def _images(wado: Wado, study: str, series: str | None) -> list[InstanceSummary]:
    """The instances with pixels of a study or series (404 when there is none)."""
    instances = [i for i in wado.instances(study, series) if i.rows]
    if not instances:
        raise NotFoundError("no image in this scope")
    return instances


def _series_thumbnail(request: Request, index: IndexDep, study: str, series: str | None) -> Response:
    instances = _images(_wado(request, index), study, series)
    middle = instances[len(instances) // 2]
    return _rendered(request, index, study, middle.series_instance_uid, middle.sop_instance_uid,
                     None, thumbnail=True)


@router.get("/studies/{study}/series/{series}/thumbnail", summary="WADO-RS: series thumbnail")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_series_thumbnail(study: str, series: str, request: Request,
                              _principal: ReadPrincipal, index: IndexDep) -> Response:
    return _series_thumbnail(request, index, study, series)


@router.get("/studies/{study}/thumbnail", summary="WADO-RS: study thumbnail")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_study_thumbnail(study: str, request: Request, _principal: ReadPrincipal,
                             index: IndexDep) -> Response:
    return _series_thumbnail(request, index, study, None)


# STOW-RS ---------------------------------------------------------------------------------
async def _store(request: Request, principal: Principal, study: str | None) -> Response:
    target = request.app.state.config.stow
    if target is None:
        raise Unavailable("STOW-RS is not configured on this API (no site spool)")
    # Uploads are filed under this API's site (its spool, queue and ownership): a credential
    # limited to other sites cannot write as this one (the trust model).
    if principal.site_ids is not None and target.spool.site_id not in principal.site_ids:
        raise Forbidden(f"this credential writes for sites {', '.join(sorted(principal.site_ids))} "
                        f"only; this API files uploads under site {target.spool.site_id}")
    if study is not None:
        check_uid(study, "StudyInstanceUID")
    study_patient: Callable[[str], str | None] | None = None
    if target.study_patient is not None:  # the region: write-backs into studies the writer reads
        check, scope = target.study_patient, principal.scope

        def study_patient(study_instance_uid: str) -> str | None:
            pseudonym = check(study_instance_uid, scope)
            return None if pseudonym is None else str(pseudonym)
    declared = request.headers.get("content-length")
    try:
        boundary, part_type = boundary_of(request.headers.get("content-type"))
        if declared and declared.isdigit() and int(declared) > target.max_bytes:
            raise StowRequestError(413, f"request body larger than {target.max_bytes} bytes")
        if target.study_patient is not None and part_type != "application/dicom":
            raise StowRequestError(415, 'the regional API takes objects of the domain as '
                                        'multipart/related; type="application/dicom" only')
        parts = await receive_parts(request.stream(), boundary, target.incoming, target.max_bytes,
                                    study_patient, max_parts=target.max_parts)
    except StowRequestError as exc:
        codes = {400: "bad_request", 413: "too_large", 415: "unsupported_media_type"}
        return Response(json.dumps(error_body(codes.get(exc.status, "bad_request"), str(exc))),
                        status_code=exc.status, media_type="application/json")
    unbuilt = 0
    if part_type == "application/dicom+json":
        parts, unbuilt = json_parts_to_instances(parts, target.incoming)
    outcome = await run_in_threadpool(spool_parts, parts, target, study, study_patient)
    for _ in range(unbuilt):
        outcome.refuse("", "", StoreStatus.CANNOT_UNDERSTAND, "a DICOM JSON data set could not be built")
    await outcome.await_replies(target.spool.root, target.reply_seconds)
    return Response(json.dumps(response_dataset(outcome, _base(request))),
                    status_code=outcome.status_code, media_type=DICOM_JSON,
                    headers=outcome.headers)


@router.post("/studies", summary="STOW-RS: store instances")
@audited(AuditAction.DICOMWEB_STORE)
async def store_instances(request: Request, principal: WritePrincipal) -> Response:
    """Instances go through the site's spool and pipeline, like C-STORE; the response lists
    referenced and failed instances (200 all stored, 202 some failed, 409 none stored)."""
    return await _store(request, principal, None)


@router.post("/studies/{study}", summary="STOW-RS: store instances of one study")
@audited(AuditAction.DICOMWEB_STORE)
async def store_study_instances(study: str, request: Request, principal: WritePrincipal) -> Response:
    return await _store(request, principal, study)


def install_error_handlers(app: FastAPI) -> None:
    """DICOMweb's own errors, mapped once to the JSON error body: a bad query parameter or
    UID 400, not found 404, no acceptable representation 406, too large to render 422."""

    @app.exception_handler(QueryParameterError)
    async def _query_error(request: Request, exc: QueryParameterError) -> JSONResponse:
        return await api_error_response(request, BadRequest(str(exc)))

    @app.exception_handler(WadoError)
    async def _wado_error(request: Request, exc: WadoError) -> JSONResponse:
        answer: ApiError = BadRequest(str(exc))
        if isinstance(exc, NotFoundError):
            answer = NotFound("not found")
        elif isinstance(exc, NotAcceptableError):
            answer = NotAcceptable(str(exc))
        elif isinstance(exc, TooLargeToRenderError):
            answer = TooLargeToRender(str(exc))
        return await api_error_response(request, answer)


def share_router() -> APIRouter:
    """The read-only DICOMweb root of a share, /s/{share_token}/dicom-web: the same GET
    resources, answered within the share's scope (principal resolved from the token)."""
    scoped = APIRouter(prefix="/s/{share_token}/dicom-web", tags=["Shares"])
    for route in router.routes:
        if isinstance(route, APIRoute) and route.methods == {"GET"}:
            scoped.add_api_route(route.path.removeprefix("/dicom-web"), route.endpoint,
                                 methods=["GET"], name=f"share_{route.name}",
                                 include_in_schema=False)
    return scoped
