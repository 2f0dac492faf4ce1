"""STOW-RS (PS3.18 10.5): store instances through the site's spool and pipeline."""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from access import AuditAction
from imaging import StoreStatus
from web_viewer_api.audit import audited
from web_viewer_api.auth import Principal
from web_viewer_api.deps import WritePrincipal
from web_viewer_api.dicomweb.stow import (
    StowRequestError,
    boundary_of,
    json_parts_to_instances,
    receive_parts,
    response_dataset,
    spool_parts,
)
from web_viewer_api.dicomweb.wado import (
    check_uid,
)
from web_viewer_api.errors import (
    Forbidden,
    Unavailable,
    error_body,
)
from web_viewer_api.routes.dicomweb.common import (
    DICOM_JSON,
    dicomweb_base,
)

router = APIRouter(prefix="/dicom-web", tags=["DICOMweb"])


async def _store(request: Request, principal: Principal, study: str | None) -> Response:
    target = request.app.state.config.stow
    if target is None:
        raise Unavailable("STOW-RS is not configured on this API (no site spool)")
    # Uploads are filed under this API's site (its spool, queue and ownership): a credential
    # limited to other sites cannot write as this one (the trust model).
    if principal.site_ids is not None and target.spool.site_id not in principal.site_ids:
        raise Forbidden(
            f"this credential writes for sites {', '.join(sorted(principal.site_ids))} "
            f"only; this API files uploads under site {target.spool.site_id}"
        )
    if target.processed is not None and not await run_in_threadpool(target.processed):
        # Accepting now would acknowledge what nothing may ever store (read-your-writes).
        raise Unavailable(
            "no worker processes this site's spool now: nothing was stored; try again later",
            retry_after=5,
        )
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
            raise StowRequestError(
                415,
                "the regional API takes objects of the domain as "
                'multipart/related; type="application/dicom" only',
            )
        parts = await receive_parts(
            request.stream(),
            boundary,
            target.incoming,
            target.max_bytes,
            study_patient,
            max_parts=target.max_parts,
        )
    except StowRequestError as exc:
        codes = {400: "bad_request", 413: "too_large", 415: "unsupported_media_type"}
        return Response(
            json.dumps(error_body(codes.get(exc.status, "bad_request"), str(exc))),
            status_code=exc.status,
            media_type="application/json",
        )
    unbuilt = 0
    if part_type == "application/dicom+json":
        parts, unbuilt = json_parts_to_instances(parts, target.incoming)
    outcome = await run_in_threadpool(spool_parts, parts, target, study, study_patient)
    for _ in range(unbuilt):
        outcome.refuse(
            "", "", StoreStatus.CANNOT_UNDERSTAND, "a DICOM JSON data set could not be built"
        )
    await outcome.await_replies(target.spool.root, target.reply_seconds)
    return Response(
        json.dumps(response_dataset(outcome, dicomweb_base(request))),
        status_code=outcome.status_code,
        media_type=DICOM_JSON,
        headers=outcome.headers,
    )


@router.post("/studies", summary="STOW-RS: store instances")
@audited(AuditAction.DICOMWEB_STORE)
async def store_instances(request: Request, principal: WritePrincipal) -> Response:
    """Instances go through the site's spool and pipeline, like C-STORE; the response lists
    referenced and failed instances (200 all stored, 202 some failed, 409 none stored)."""
    return await _store(request, principal, None)


@router.post("/studies/{study}", summary="STOW-RS: store instances of one study")
@audited(AuditAction.DICOMWEB_STORE)
async def store_study_instances(
    study: str, request: Request, principal: WritePrincipal
) -> Response:
    return await _store(request, principal, study)
