"""DICOMweb Studies Service routes (PS3.18): QIDO-RS for now."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import Response

from web_viewer_api.deps import IndexDep, ReadPrincipal
from web_viewer_api.dicomweb.qido import QueryParameterError, parse_study_query, study_to_dicom_json
from web_viewer_api.errors import BadRequest, NotAcceptable

router = APIRouter(prefix="/dicom-web", tags=["DICOMweb"])

DICOM_JSON = "application/dicom+json"
_ACCEPTABLE_JSON = {DICOM_JSON, "application/json", "*/*", "application/*"}


def _require_json(request: Request) -> None:
    accept = request.headers.get("accept", "")
    if not accept:
        return
    for part in accept.split(","):
        media_type = part.split(";")[0].strip().lower()
        if media_type in _ACCEPTABLE_JSON:
            return
    raise NotAcceptable("QIDO-RS answers application/dicom+json only")


@router.get(
    "/studies",
    summary="QIDO-RS: search for studies",
    responses={200: {"content": {DICOM_JSON: {}}}, 400: {}, 401: {}, 406: {}},
)
def search_for_studies(request: Request, _principal: ReadPrincipal, index: IndexDep) -> Response:
    """Match studies on PatientID, PatientName, AccessionNumber, StudyDate (range),
    StudyInstanceUID (list), ModalitiesInStudy; `limit`/`offset` page the results."""
    _require_json(request)
    try:
        parsed = parse_study_query(request.query_params.multi_items())
    except QueryParameterError as exc:
        raise BadRequest(str(exc)) from exc
    studies = index.search_studies(parsed.query)
    base = str(request.base_url).rstrip("/") + "/dicom-web"
    body = [study_to_dicom_json(s, base) for s in studies]
    headers: dict[str, str] = {}
    warnings = []
    if parsed.ignored:
        warnings.append(f'299 dicom-gateway "unsupported matching keys ignored: {", ".join(parsed.ignored)}"')
    if parsed.fuzzy_requested:
        warnings.append('299 dicom-gateway "fuzzymatching is not supported"')
    if warnings:
        headers["Warning"] = ", ".join(warnings)
    # CP-2473: no match is 200 with an empty array, not 204.
    return Response(json.dumps(body), media_type=DICOM_JSON, headers=headers)
