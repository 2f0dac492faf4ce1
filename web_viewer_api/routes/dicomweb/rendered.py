"""WADO-RS rendered resources (PS3.18 10.4.1.1.3): rendered instances, frames, series and
studies, and thumbnails."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import Response

from access import AuditAction
from storage import (
    InstanceSummary,
    ObjectNotFound,
)
from web_viewer_api.audit import audited
from web_viewer_api.deps import IndexDep, ReadPrincipal
from web_viewer_api.dicomweb.multipart import (
    Part,
    parse_accept,
)
from web_viewer_api.dicomweb.rendering import RenderedCache, RenderLimits
from web_viewer_api.dicomweb.wado import (
    THUMBNAIL_SIZE,
    BadRequestError,
    NotAcceptableError,
    NotFoundError,
    RenderParameters,
    Wado,
    check_declared_frame,
    parse_frame_list,
    parse_render_parameters,
    render_instance,
)
from web_viewer_api.routes.dicomweb.common import (
    IMMUTABLE,
    dicomweb_base,
    multipart_response,
    wado_for,
    while_shared,
)

router = APIRouter(prefix="/dicom-web", tags=["DICOMweb"])


def _render_setup(
    request: Request, accept: str | None, thumbnail: bool = False
) -> tuple[RenderParameters, RenderLimits, RenderedCache | None]:
    """The request's validated parameters (400/406 before anything is read), the render
    limits and the rendered-image cache."""
    params = request.query_params
    parameters = parse_render_parameters(
        accept,
        viewport=params.get("viewport")
        or (f"{THUMBNAIL_SIZE},{THUMBNAIL_SIZE}" if thumbnail else None),
        window=params.get("window"),
        quality=params.get("quality"),
    )
    return parameters, request.app.state.config.rendering, request.app.state.rendered_cache


def _rendered(
    request: Request,
    index: IndexDep,
    study: str,
    series: str,
    sop: str,
    frames: list[int] | None,
    thumbnail: bool = False,
) -> Response:
    """One image of the instance: of the middle one of `frames` (each of which must exist)."""
    parameters, limits, cache = _render_setup(request, request.headers.get("accept"), thumbnail)
    wado = wado_for(request, index)
    [instance] = wado.instances(study, series, sop)
    image = render_instance(wado, instance, parameters, frames=frames, limits=limits, cache=cache)
    # The representation depends on Accept: caches must not hand a PNG to a JPEG request.
    return Response(
        image,
        media_type=parameters.media_type,
        headers={"Cache-Control": IMMUTABLE, "Vary": "Accept"},
    )


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/rendered",
    summary="WADO-RS: rendered instance",
)
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_rendered_instance(
    study: str, series: str, sop: str, request: Request, _principal: ReadPrincipal, index: IndexDep
) -> Response:
    return _rendered(request, index, study, series, sop, None)


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/frames/{frame}/rendered",
    summary="WADO-RS: rendered frame",
)
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_rendered_frame(
    study: str,
    series: str,
    sop: str,
    frame: str,
    request: Request,
    _principal: ReadPrincipal,
    index: IndexDep,
) -> Response:
    def call() -> Response:
        numbers = parse_frame_list(frame)
        if len(numbers) != 1:
            raise BadRequestError("one frame per rendered request")
        return _rendered(request, index, study, series, sop, numbers)

    return call()


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/frames/{frames}/thumbnail",
    summary="WADO-RS: frame thumbnail",
)
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_frame_thumbnail(
    study: str,
    series: str,
    sop: str,
    frames: str,
    request: Request,
    _principal: ReadPrincipal,
    index: IndexDep,
) -> Response:
    """A thumbnail representative of the listed frames (PS3.18 §10.4, Sup 203): the
    middle one of the list, as the series thumbnail takes its middle instance."""

    def call() -> Response:
        return _rendered(
            request, index, study, series, sop, parse_frame_list(frames), thumbnail=True
        )

    return call()


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/thumbnail",
    summary="WADO-RS: instance thumbnail",
)
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_instance_thumbnail(
    study: str, series: str, sop: str, request: Request, _principal: ReadPrincipal, index: IndexDep
) -> Response:
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
    raise NotAcceptableError(
        'rendered studies and series are multipart/related; type="image/jpeg" or type="image/png"'
    )


def _rendered_many(request: Request, index: IndexDep, study: str, series: str | None) -> Response:
    """Every image instance of the study or series, rendered like its instance resource
    (one image each, `window`/`viewport`/`quality` applied), as one multipart answer."""
    part_type = _rendered_part_type(request.headers.get("accept"))
    parameters, limits, cache = _render_setup(request, part_type)
    wado = wado_for(request, index)
    instances = _images(wado, study, series)
    for instance in instances:  # one frame too large to render: 422 before the answer starts
        check_declared_frame(limits, instance.rows, instance.columns)
    base = dicomweb_base(request)

    def parts() -> Iterator[Part]:
        for instance in instances:
            try:
                image = render_instance(wado, instance, parameters, limits=limits, cache=cache)
            except ObjectNotFound:
                continue  # indexed but gone, as in a retrieval: never a broken part
            yield (
                parameters.media_type,
                image,
                {
                    "Content-Location": (
                        f"{base}/studies/{instance.study_instance_uid}/series/{instance.series_instance_uid}"
                        f"/instances/{instance.sop_instance_uid}/rendered"
                    )
                },
            )

    rendering = parts()
    first = next(rendering, None)  # the first image's failure is an error answer, not a cut one
    if first is None:
        raise NotFoundError("not found")
    return multipart_response(
        part_type, itertools.chain((first,), while_shared(request, rendering))
    )


@router.get("/studies/{study}/series/{series}/rendered", summary="WADO-RS: rendered series")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_rendered_series(
    study: str, series: str, request: Request, _principal: ReadPrincipal, index: IndexDep
) -> Response:
    return _rendered_many(request, index, study, series)


@router.get("/studies/{study}/rendered", summary="WADO-RS: rendered study")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_rendered_study(
    study: str, request: Request, _principal: ReadPrincipal, index: IndexDep
) -> Response:
    return _rendered_many(request, index, study, None)


def _images(wado: Wado, study: str, series: str | None) -> list[InstanceSummary]:
    """The instances with pixels of a study or series (404 when there is none)."""
    instances = [i for i in wado.instances(study, series) if i.rows]
    if not instances:
        raise NotFoundError("no image in this scope")
    return instances


def _series_thumbnail(
    request: Request, index: IndexDep, study: str, series: str | None
) -> Response:
    instances = _images(wado_for(request, index), study, series)
    middle = instances[len(instances) // 2]
    return _rendered(
        request,
        index,
        study,
        middle.series_instance_uid,
        middle.sop_instance_uid,
        None,
        thumbnail=True,
    )


@router.get("/studies/{study}/series/{series}/thumbnail", summary="WADO-RS: series thumbnail")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_series_thumbnail(
    study: str, series: str, request: Request, _principal: ReadPrincipal, index: IndexDep
) -> Response:
    return _series_thumbnail(request, index, study, series)


@router.get("/studies/{study}/thumbnail", summary="WADO-RS: study thumbnail")
@audited(AuditAction.DICOMWEB_RETRIEVE)
def retrieve_study_thumbnail(
    study: str, request: Request, _principal: ReadPrincipal, index: IndexDep
) -> Response:
    return _series_thumbnail(request, index, study, None)
