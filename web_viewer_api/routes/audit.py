"""GET /api/audit: the audit trail, filtered and paged, or exported as JSON Lines."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from access import ACTIONS, AuditAction
from storage import AccessRepository, AuditQuery
from web_viewer_api.audit import to_dict
from web_viewer_api.deps import AdminPrincipal
from web_viewer_api.errors import BadRequest

router = APIRouter(prefix="/api", tags=["Audit"])


@router.get(
    "/audit",
    summary="Audit events (scope admin; a key limited to sites reads those "
    "sites' events and its own); format=jsonl exports them all",
)
def read_audit(
    request: Request,
    principal: AdminPrincipal,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    action: Annotated[list[str] | None, Query(max_length=20)] = None,
    actor: Annotated[str | None, Query(max_length=300)] = None,
    share_id: Annotated[str | None, Query(max_length=32)] = None,
    study_uid: Annotated[str | None, Query(max_length=64)] = None,
    address: Annotated[str | None, Query(max_length=64)] = None,
    failures: bool = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    format: Annotated[str, Query(pattern="^(json|jsonl)$")] = "json",
) -> Response:
    unknown = sorted(set(action or ()) - set(ACTIONS))
    if unknown:
        raise BadRequest(f"unknown action {unknown[0]!r}; known: {', '.join(sorted(ACTIONS))}")
    for moment in (since, until):
        if moment is not None and moment.tzinfo is None:
            raise BadRequest("since/until need a time zone (e.g. 2026-11-23T10:00:00Z)")
    query = AuditQuery(
        since=since,
        until=until,
        actions=tuple(action or ()),
        actor=actor,
        share_id=share_id,
        study_instance_uid=study_uid,
        address=address,
        failures_only=failures,
        limit=limit,
        offset=offset,
        # a site-limited admin reads its sites' events and its own only
        site_ids=principal.site_ids,
        caller=principal.subject,
    )
    request.state.audit = {"action": AuditAction.AUDIT_READ}
    access: AccessRepository = request.app.state.access
    request.app.state.audit_writer.flush()  # what this process queued is part of the answer
    if format == "jsonl":
        return StreamingResponse(
            _export(access, query),
            media_type="application/jsonl",
            headers={"Content-Disposition": 'attachment; filename="audit.jsonl"'},
        )
    events = access.search_audit(query)
    body: dict[str, Any] = {
        "events": [to_dict(e) for e in events],
        "limit": limit,
        "offset": offset,
    }
    if len(events) == limit:
        body["next_offset"] = offset + limit
    return JSONResponse(body)


def _export(access: AccessRepository, query: AuditQuery) -> Iterator[bytes]:
    """Every matching event, oldest first, by keyset pages of 1,000 (constant memory)."""
    after: int | None = None
    while True:
        page = access.search_audit(
            AuditQuery(
                **{
                    **query.__dict__,
                    "after_id": after,
                    "limit": 1000,
                    "offset": 0,
                    "newest_first": False,
                }
            )
        )
        if not page:
            return
        yield b"".join(json.dumps(to_dict(e)).encode() + b"\n" for e in page)
        after = page[-1].event_id
