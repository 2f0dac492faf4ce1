"""/api/site/lookup: original identifiers -> pseudonyms and de-identified studies, answered by
a site's API only (it holds the pseudonymization secret; the regional API does not)."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from access import AuditAction
from storage import AccessScope
from web_viewer_api.deps import SharePrincipal
from web_viewer_api.dicomweb.qido import study_to_dicom_json
from web_viewer_api.errors import BadRequest, Forbidden, NotFound, Unavailable
from web_viewer_api.lookup import (
    COMPUTED_AT_THE_SITE,
    LookupAnswer,
    OriginalIdentifiers,
    find_studies,
    lookup_sites,
)

router = APIRouter(prefix="/api/site", tags=["Site"])

_IDENTIFIER = Field(None, min_length=1, max_length=64)
_ISSUER = Field("", max_length=64)


class LookupRequest(BaseModel):
    """Identifiers travel in the body: a URL is kept by access logs and proxies."""

    model_config = ConfigDict(extra="forbid")
    accession_number: str | None = _IDENTIFIER
    issuer_of_accession_number: str = _ISSUER
    patient_id: str | None = _IDENTIFIER
    #: The patient ID's issuer; an INS issuer OID (the ANS's) makes it a national identifier.
    issuer_of_patient_id: str = _ISSUER
    #: The producing site the accession number belongs to (default: every site the caller
    #: may read — its own list, or each site the index holds studies of).
    site: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")


class LookupAnswerPublic(BaseModel):
    """The matching studies only: the keyed pseudonym of any identifier a caller submits
    would let it test candidate identifiers (an INS dictionary) against what it sees."""

    study_uids: list[str]
    studies: list[dict[str, Any]]


@router.post(
    "/lookup",
    response_model=LookupAnswerPublic,
    summary="Original accession number / patient ID -> de-identified studies (site API)",
)
async def lookup(body: LookupRequest, request: Request, principal: SharePrincipal) -> JSONResponse:
    """Recomputes the keyed pseudonyms of the identifiers with this site's secret and returns
    the matching de-identified studies within the caller's sites (never the pseudonyms).
    Nothing identifying is stored or logged: the audit trail records that a lookup happened
    and how many studies matched."""
    config = request.app.state.config
    if config.role == "region":
        raise NotFound(COMPUTED_AT_THE_SITE)
    if config.lookup is None:
        raise Unavailable("lookup needs the pseudonymization secret on this site's API")
    if not (body.accession_number or body.patient_id):
        raise BadRequest("give accession_number and/or patient_id")
    if (
        principal.site_ids is not None
        and body.site is not None
        and body.site not in principal.site_ids
    ):
        raise Forbidden("these credentials are limited to other sites")
    identifiers = OriginalIdentifiers(
        body.accession_number,
        body.issuer_of_accession_number,
        body.patient_id,
        body.issuer_of_patient_id,
    )
    index, scope = request.app.state.index, AccessScope(site_ids=principal.site_ids)

    def search() -> tuple[list[str], LookupAnswer]:
        sites = [body.site] if body.site else lookup_sites(index, scope)
        return sites, find_studies(config.lookup, index, identifiers, sites, scope)

    sites, answer = await anyio.to_thread.run_sync(search)
    request.state.audit = {
        "action": AuditAction.STUDY_LOOKUP,
        "detail": {"matches": len(answer.studies), "sites": sites},
    }
    base = (config.public_url or str(request.base_url)).rstrip("/") + "/dicom-web"
    result = LookupAnswerPublic(
        study_uids=[s.study_instance_uid for s in answer.studies],
        studies=[study_to_dicom_json(s, base) for s in answer.studies],
    )
    return JSONResponse(result.model_dump(mode="json"), headers={"Cache-Control": "no-store"})
