"""What the DICOMweb transactions share: content negotiation (DICOM JSON or XML), the
caller's scope, answers as DICOM JSON (gzip, ETag, Last-Modified, Warning), multipart
responses that stop when a share ends."""

from __future__ import annotations

import datetime as dt
import email.utils
import gzip
import hashlib
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from imaging.dicom_model import json_bytes, native_xml
from storage import (
    EVERY_SITE,
    AccessScope,
    InstanceQuery,
    InstanceSummary,
    SeriesQuery,
    StudyQuery,
)
from web_viewer_api.auth import Principal
from web_viewer_api.deps import IndexDep
from web_viewer_api.dicomweb.multipart import (
    multipart_content_type,
    multipart_stream,
    new_boundary,
    parse_accept,
)
from web_viewer_api.dicomweb.qido import (
    ParsedQuery,
)
from web_viewer_api.dicomweb.wado import (
    Wado,
)
from web_viewer_api.errors import (
    NotAcceptable,
)
from web_viewer_api.loop_reads import StreamedPart, multipart_body

FoundT = TypeVar("FoundT")
QueryT = TypeVar("QueryT", StudyQuery, SeriesQuery, InstanceQuery)
PartT = TypeVar("PartT")

DICOM_JSON = "application/dicom+json"
ACCEPTABLE_JSON = {DICOM_JSON, "application/json", "*/*", "application/*"}
IMMUTABLE = "private, max-age=3600"


def wants_xml(request: Request) -> bool:
    """True when the client prefers multipart/related; type="application/dicom+xml"."""
    for media in parse_accept(request.headers.get("accept")):
        if media.media_type in ACCEPTABLE_JSON:
            return False
        if (
            media.media_type == "multipart/related"
            and media.params.get("type", "").lower() == "application/dicom+xml"
        ):
            return True
    return False


def require_json(request: Request) -> None:
    if wants_xml(request) or any(
        media.media_type in ACCEPTABLE_JSON for media in parse_accept(request.headers.get("accept"))
    ):
        return
    raise NotAcceptable(
        'this resource is application/dicom+json or multipart/related; type="application/dicom+xml"'
    )


def scope_of(request: Request) -> AccessScope:
    principal: Principal | None = getattr(request.state, "principal", None)
    return principal.scope if principal is not None else EVERY_SITE


def wado_for(request: Request, index: IndexDep) -> Wado:
    return Wado(
        index, request.app.state.store, scope_of(request), request.app.state.config.decode_limits
    )


def dicomweb_base(request: Request) -> str:
    """This DICOMweb root's absolute URL (a share's own root under /s/{token})."""
    public = request.app.state.config.public_url
    root = public.rstrip("/") if public else str(request.base_url).rstrip("/")
    share_token = request.path_params.get("share_token")
    return root + (f"/s/{share_token}" if share_token else "") + "/dicom-web"


def json_answer(
    body: Any, headers: dict[str, str] | None = None, request: Request | None = None
) -> Response:
    """DICOM JSON (or Native DICOM Model XML parts when the client prefers them); JSON is
    gzip-compressed when the client accepts it and it is worth it."""
    if request is not None and wants_xml(request):
        boundary = new_boundary()
        parts: list[tuple[str, bytes, dict[str, str]]] = [
            ("application/dicom+xml", native_xml(document), {}) for document in body
        ]
        return Response(
            b"".join(multipart_stream(parts, boundary)),
            headers={**(headers or {}), "Vary": "Accept, Accept-Encoding"},
            media_type=multipart_content_type("application/dicom+xml", boundary),
        )
    payload = json_bytes(body)
    # JSON or XML, gzip or not: both depend on the request's headers.
    extra = {**(headers or {}), "Vary": "Accept, Accept-Encoding"}
    if (
        request is not None
        and len(payload) > 1024
        and "gzip" in request.headers.get("accept-encoding", "").lower()
    ):
        payload = gzip.compress(payload, compresslevel=5)
        extra["Content-Encoding"] = "gzip"
    return Response(payload, media_type=DICOM_JSON, headers=extra)


def etag_of(instances: list[InstanceSummary], variant: str) -> str:
    """A strong validator of immutable content: the stored objects' SHA-256 and the variant."""
    digest = hashlib.sha256(variant.encode())
    for instance in instances:
        digest.update(instance.sha256.encode())
    return f'"{digest.hexdigest()[:32]}"'


def not_modified(request: Request, etag: str, last_modified: str | None) -> Response | None:
    if etag in {t.strip() for t in request.headers.get("if-none-match", "").split(",")}:
        headers = {"ETag": etag, "Cache-Control": IMMUTABLE}
        if last_modified:
            headers["Last-Modified"] = last_modified
        return Response(status_code=304, headers=headers)
    return None


def last_modified(instances: list[InstanceSummary]) -> str | None:
    moments = [i.updated_at for i in instances if i.updated_at is not None]
    if not moments:
        return None
    latest = max(m if m.tzinfo else m.replace(tzinfo=dt.UTC) for m in moments)
    return email.utils.format_datetime(latest.astimezone(dt.UTC), usegmt=True)


def warning_headers(parsed: Any, returned: int) -> dict[str, str]:
    """Warning header values (PS3.18 §8.6): ignored keys, no fuzzy matching, truncation."""
    warnings = []
    if parsed.ignored:
        warnings.append(
            f'299 dicom-gateway "unsupported matching keys ignored: {", ".join(parsed.ignored)}"'
        )
    if parsed.fuzzy_requested:
        warnings.append('299 dicom-gateway "fuzzymatching is not supported"')
    limit = int(parsed.limit if isinstance(parsed, ParsedQuery) else parsed.query.limit)
    if returned >= limit:
        warnings.append('299 dicom-gateway "There are additional results that can be requested"')
    return {"Warning": ", ".join(warnings)} if warnings else {}


def while_shared(request: Request, parts: Iterator[PartT]) -> Iterator[PartT]:
    """The parts of an answer through a share link stop soon after the share is revoked
    (`ShareGate.while_live`): a long retrieval does not outlive the sender's decision."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None or principal.share is None:
        return parts
    return request.app.state.share_gate.while_live(  # type: ignore[no-any-return]
        principal.share.share_id, parts, request.app.state.config.share_liveness_seconds
    )


def multipart_response(
    part_type: str, parts: Iterable[StreamedPart], headers: dict[str, str] | None = None
) -> StreamingResponse:
    """A streamed multipart/related answer of immutable content."""
    boundary = new_boundary()
    return StreamingResponse(
        multipart_body(parts, boundary),
        media_type=multipart_content_type(part_type, boundary),
        headers={"Cache-Control": IMMUTABLE, "Vary": "Accept", **(headers or {})},
    )
