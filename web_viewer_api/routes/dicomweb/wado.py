"""WADO-RS (PS3.18 10.4): retrieve instances, metadata, frames and bulk data."""

from __future__ import annotations

import itertools

from fastapi import APIRouter, Request
from fastapi.responses import Response

from access import AuditAction, Permission
from web_viewer_api.audit import audited
from web_viewer_api.auth import Principal
from web_viewer_api.deps import IndexDep, ReadPrincipal
from web_viewer_api.dicomweb.wado import (
    BadRequestError,
    NotFoundError,
    frame_parts,
    negotiate_instance_representation,
    parse_frame_list,
)
from web_viewer_api.errors import (
    Forbidden,
)
from web_viewer_api.loop_reads import as_bytes
from web_viewer_api.routes.dicomweb.common import (
    IMMUTABLE,
    dicomweb_base,
    etag_of,
    json_answer,
    last_modified,
    multipart_response,
    not_modified,
    require_json,
    wado_for,
    while_shared,
)

router = APIRouter(prefix="/dicom-web", tags=["DICOMweb"])


def _retrieve(
    request: Request, index: IndexDep, study: str, series: str | None = None, sop: str | None = None
) -> Response:
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is not None and not principal.may(Permission.DOWNLOAD):
        raise Forbidden("this share allows viewing, not downloading whole instances")
    wado = wado_for(request, index)
    representation = negotiate_instance_representation(
        request.headers.get("accept"), instance_resource=sop is not None
    )
    syntax = representation.transfer_syntax
    instances = wado.instances(study, series, sop)
    # The study is indexed (a de-identified UID): the trail may name it even if the stream
    # fails later (a failed request's own path is not kept, see web_viewer_api.audit).
    request.state.audit = {**(getattr(request.state, "audit", None) or {}), "study": study}
    variant = f"dicom:{syntax}" + (":single" if representation.single_part else "")
    etag, modified = etag_of(instances, variant), last_modified(instances)
    cached = not_modified(request, etag, modified)
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
        return Response(
            first[1],
            media_type=content_type,
            headers={"Cache-Control": IMMUTABLE, "Vary": "Accept", **headers},
        )
    return multipart_response(
        "application/dicom", itertools.chain((first,), while_shared(request, parts)), headers
    )


@router.get("/studies/{study}", summary="WADO-RS: retrieve a study")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_study(
    study: str, request: Request, _principal: ReadPrincipal, index: IndexDep
) -> Response:
    return _retrieve(request, index, study)


@router.get("/studies/{study}/series/{series}", summary="WADO-RS: retrieve a series")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_series(
    study: str, series: str, request: Request, _principal: ReadPrincipal, index: IndexDep
) -> Response:
    return _retrieve(request, index, study, series)


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}", summary="WADO-RS: retrieve an instance"
)
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_instance(
    study: str, series: str, sop: str, request: Request, _principal: ReadPrincipal, index: IndexDep
) -> Response:
    return _retrieve(request, index, study, series, sop)


def _metadata(
    request: Request, index: IndexDep, study: str, series: str | None = None, sop: str | None = None
) -> Response:
    require_json(request)
    wado = wado_for(request, index)
    instances = wado.instances(study, series, sop)
    etag, modified = (
        etag_of(instances, f"metadata:{dicomweb_base(request)}"),
        last_modified(instances),
    )
    cached = not_modified(request, etag, modified)
    if cached is not None:
        return cached
    headers = {"Cache-Control": IMMUTABLE, "ETag": etag}
    if modified:
        headers["Last-Modified"] = modified
    return json_answer(wado.metadata(instances, dicomweb_base(request)), headers, request)


@router.get("/studies/{study}/metadata", summary="WADO-RS: study metadata")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_study_metadata(
    study: str, request: Request, _principal: ReadPrincipal, index: IndexDep
) -> Response:
    return _metadata(request, index, study)


@router.get("/studies/{study}/series/{series}/metadata", summary="WADO-RS: series metadata")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_series_metadata(
    study: str, series: str, request: Request, _principal: ReadPrincipal, index: IndexDep
) -> Response:
    return _metadata(request, index, study, series)


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/metadata",
    summary="WADO-RS: instance metadata",
)
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_instance_metadata(
    study: str, series: str, sop: str, request: Request, _principal: ReadPrincipal, index: IndexDep
) -> Response:
    return _metadata(request, index, study, series, sop)


def _frames(
    request: Request, index: IndexDep, study: str, series: str, sop: str, frames: str
) -> Response:
    numbers = parse_frame_list(frames)
    wado = wado_for(request, index)
    [instance] = wado.instances(study, series, sop)
    dataset = wado.dataset(instance, decoded=False)  # compressed frames go out undecoded
    if "PixelData" not in dataset:
        raise NotFoundError("no pixel data")
    part_type, parts = frame_parts(dataset, numbers, request.headers.get("accept"), wado.limits)
    return multipart_response(part_type, parts)


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/frames/{frames}",
    summary="WADO-RS: retrieve frames",
)
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_frames(
    study: str,
    series: str,
    sop: str,
    frames: str,
    request: Request,
    _principal: ReadPrincipal,
    index: IndexDep,
) -> Response:
    return _frames(request, index, study, series, sop, frames)


def _bulkdata(
    request: Request, index: IndexDep, study: str, series: str, sop: str, tag: str
) -> Response:
    try:
        number = int(tag, 16) if len(tag) == 8 else -1
        if number < 0:
            raise ValueError(tag)
    except ValueError as exc:
        raise BadRequestError("bulk data is addressed by an 8-digit hexadecimal tag") from exc
    wado = wado_for(request, index)
    [instance] = wado.instances(study, series, sop)
    dataset = wado.dataset(instance, decoded=False)
    if number not in dataset:
        raise NotFoundError("no such bulk data")
    if number == 0x7FE00010:
        numbers = list(range(1, int(dataset.get("NumberOfFrames", 1) or 1) + 1))
        part_type, parts = frame_parts(dataset, numbers, request.headers.get("accept"), wado.limits)
        return multipart_response(part_type, parts)
    value = dataset[number].value
    if not isinstance(value, bytes | bytearray):
        raise NotFoundError("this attribute is not bulk data")
    return multipart_response(
        "application/octet-stream", [("application/octet-stream", bytes(value), {})]
    )


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/bulkdata/{tag}",
    summary="WADO-RS: bulk data of an instance (the BulkDataURIs of its metadata)",
)
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_bulkdata(
    study: str,
    series: str,
    sop: str,
    tag: str,
    request: Request,
    _principal: ReadPrincipal,
    index: IndexDep,
) -> Response:
    return _bulkdata(request, index, study, series, sop, tag)
