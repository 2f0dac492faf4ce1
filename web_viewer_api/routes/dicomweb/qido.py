"""QIDO-RS (PS3.18 10.6): search for studies, series and instances."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response

from access import AuditAction
from storage import (
    AccessScope,
    IndexRepository,
    InstanceSummary,
    QueryRetrieve,
    SeriesSummary,
    StudySummary,
)
from web_viewer_api.audit import audited
from web_viewer_api.deps import IndexDep, ReadPrincipal
from web_viewer_api.dicomweb.qido import (
    INSTANCE_MATCHING_KEYS,
    SERIES_LEVEL_TAGS,
    SERIES_MATCHING_KEYS,
    STUDY_LEVEL_TAGS,
    include_fields,
    instance_query,
    instance_to_dicom_json,
    parse_query,
    parse_study_query,
    series_query,
    series_to_dicom_json,
    study_to_dicom_json,
)
from web_viewer_api.dicomweb.wado import (
    check_uid,
)
from web_viewer_api.loop_reads import answer_search
from web_viewer_api.routes.dicomweb.common import (
    FoundT,
    QueryT,
    dicomweb_base,
    json_answer,
    require_json,
    scope_of,
    wado_for,
    wants_xml,
    warning_headers,
)

router = APIRouter(prefix="/dicom-web", tags=["DICOMweb"])


async def _search(
    request: Request,
    index: IndexRepository,
    include: frozenset[str],
    query: QueryT,
    verb: Callable[[QueryRetrieve, AccessScope, QueryT], list[FoundT]],
    answer: Callable[[list[FoundT]], Response],
) -> Response:
    """`answer(verb(query))` in the caller's scope; where it runs is `loop_reads`' choice."""
    scope = scope_of(request)

    def search(repository: IndexRepository) -> list[FoundT]:
        return verb(QueryRetrieve(repository), scope, query)

    return await answer_search(
        request,
        index,
        query,
        scope,
        search,
        answer,
        index_only=not include and not wants_xml(request),
    )


@router.get("/studies", summary="QIDO-RS: search for studies")
@audited(AuditAction.DICOMWEB_SEARCH)
async def search_for_studies(
    request: Request, _principal: ReadPrincipal, index: IndexDep
) -> Response:
    """Match studies on the required keys of PS3.18 Table 10.6.1-5: StudyDate and
    StudyTime (ranges), AccessionNumber, StudyID, PatientID (wildcards), PatientName and
    ReferringPhysicianName (fuzzy with `fuzzymatching=true`), StudyInstanceUID (list),
    ModalitiesInStudy; `limit`/`offset` page the results. No match is `200 []` (CP-2473)."""
    require_json(request)
    parsed = parse_study_query(request.query_params.multi_items())
    query = parsed.query

    def answer(studies: list[StudySummary]) -> Response:
        wado = wado_for(request, index)
        body = [
            include_fields(
                study_to_dicom_json(s, dicomweb_base(request)),
                wado.representative(s.study_instance_uid) if parsed.include else None,
                parsed.include,
                STUDY_LEVEL_TAGS,
            )
            for s in studies
        ]
        return json_answer(
            body,
            warning_headers(parsed, len(body))
            if parsed.ignored or parsed.fuzzy_requested or len(body) >= query.limit
            else {},
            request,
        )

    return await _search(
        request, index, parsed.include, query, QueryRetrieve.search_for_studies, answer
    )


async def _series(request: Request, index: IndexRepository, study: str | None) -> Response:
    require_json(request)
    parsed = parse_query(request.query_params.multi_items(), SERIES_MATCHING_KEYS)
    study = study or parsed.values.get("StudyInstanceUID")
    if study:
        check_uid(study, "StudyInstanceUID")
    query = series_query(parsed, study)

    def answer(series: list[SeriesSummary]) -> Response:
        wado = wado_for(request, index)
        body = [
            include_fields(
                series_to_dicom_json(s, dicomweb_base(request)),
                wado.representative(s.study_instance_uid, s.series_instance_uid)
                if parsed.include
                else None,
                parsed.include,
                STUDY_LEVEL_TAGS | SERIES_LEVEL_TAGS,
            )
            for s in series
        ]
        return json_answer(body, warning_headers(parsed, len(body)), request)

    return await _search(
        request, index, parsed.include, query, QueryRetrieve.search_for_series, answer
    )


@router.get("/series", summary="QIDO-RS: search for series")
@audited(AuditAction.DICOMWEB_SEARCH)
async def search_for_all_series(
    request: Request, _principal: ReadPrincipal, index: IndexDep
) -> Response:
    return await _series(request, index, None)


@router.get("/studies/{study}/series", summary="QIDO-RS: search for a study's series")
@audited(AuditAction.DICOMWEB_SEARCH)
async def search_for_series(
    study: str, request: Request, _principal: ReadPrincipal, index: IndexDep
) -> Response:
    return await _series(request, index, study)


async def _instances(
    request: Request, index: IndexRepository, study: str | None, series: str | None
) -> Response:
    require_json(request)
    parsed = parse_query(request.query_params.multi_items(), INSTANCE_MATCHING_KEYS)
    study = study or parsed.values.get("StudyInstanceUID")
    series = series or parsed.values.get("SeriesInstanceUID")
    for value, what in ((study, "StudyInstanceUID"), (series, "SeriesInstanceUID")):
        if value:
            check_uid(value, what)
    query = instance_query(parsed, study, series)

    def answer(found: list[InstanceSummary]) -> Response:
        wado = wado_for(request, index)
        body = [
            include_fields(
                instance_to_dicom_json(i, dicomweb_base(request)),
                wado.instance_json(i) if parsed.include else None,
                parsed.include,
                None,
            )
            for i in found
        ]
        return json_answer(body, warning_headers(parsed, len(body)), request)

    return await _search(
        request, index, parsed.include, query, QueryRetrieve.search_for_instances, answer
    )


@router.get("/instances", summary="QIDO-RS: search for instances")
@audited(AuditAction.DICOMWEB_SEARCH)
async def search_for_all_instances(
    request: Request, _principal: ReadPrincipal, index: IndexDep
) -> Response:
    return await _instances(request, index, None, None)


@router.get("/studies/{study}/instances", summary="QIDO-RS: search for a study's instances")
@audited(AuditAction.DICOMWEB_SEARCH)
async def search_for_study_instances(
    study: str, request: Request, _principal: ReadPrincipal, index: IndexDep
) -> Response:
    return await _instances(request, index, study, None)


@router.get(
    "/studies/{study}/series/{series}/instances", summary="QIDO-RS: search for a series' instances"
)
@audited(AuditAction.DICOMWEB_SEARCH)
async def search_for_instances(
    study: str, series: str, request: Request, _principal: ReadPrincipal, index: IndexDep
) -> Response:
    return await _instances(request, index, study, series)
