"""The audit trail: one append-only event per API request (and per CLI change), in the DICOM
audit message vocabulary (PS3.15 A.5: EventID, EventActionCode, EventOutcomeIndicator,
ActiveParticipant, ParticipantObject) so it can feed an ATNA repository."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import unquote_plus

from pydicom.datadict import tag_for_keyword
from starlette.types import ASGIApp, Receive, Scope, Send

from access import EVENT_NAMES, AuditAction, audit_entry
from storage import AuditEntry, AuditWriter
from web_viewer_api.asgi import StatusRecorder

log = logging.getLogger(__name__)

_Endpoint = TypeVar("_Endpoint", bound=Callable[..., Any])


def audited(action: AuditAction) -> Callable[[_Endpoint], _Endpoint]:
    """Declare the action a route does: the event its requests are audited as."""

    def mark(endpoint: _Endpoint) -> _Endpoint:
        endpoint.audit_action = action  # type: ignore[attr-defined]
        return endpoint

    return mark


#: Failures the limiters count (docs/admin/security/lockout.md). Against the client address:
#: bearer tokens that open nothing (not a missing one: that guesses nothing), unknown share
#: tokens. Against the API key id (the event's actor, `key:<id>`): wrong secrets of a key.
#: Wrong PINs are counted on their share itself (storage: pin_failures).
INVALID_TOKENS = ("auth.invalid_token",)
SHARE_FAILURES = ("share.unknown_token",)
KEY_FAILURES = ("auth.key_failure",)

_SHARE_PATH = re.compile(r"^/s/[^/]+")
#: Query parameters whose values are kept when they have a harmless form (numbers, keywords):
#: paging and output form. Every other value is withheld from the trail: a matching key
#: (PatientID, AccessionNumber, a UID...) holds whatever the caller typed, an original
#: identifier as easily as a pseudonym.
_PLAIN_PARAMETERS = frozenset(
    {"limit", "offset", "includefield", "fuzzymatching", "format", "active", "charset"}
)
#: Our own parameter names (the audit and share listings); DICOM keywords and tags are known too.
_API_PARAMETERS = frozenset(
    {"action", "actor", "share_id", "study_uid", "address", "since", "until", "site", "accept"}
)
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
WITHHELD = "(withheld)"


def _dicom_attribute(name: str) -> bool:
    """A keyword or tag, or a dotted path of them (QIDO sequence matching)."""
    return all(_TAG.match(part) or tag_for_keyword(part) is not None for part in name.split("."))


def _harmless(value: str) -> bool:
    return all(
        item.isdigit()
        or item.lower() in ("true", "false", "json", "jsonl", "all")
        or _dicom_attribute(item)
        for item in value.split(",")
        if item
    )


def _withheld_query(query: str) -> str:
    """The query string, values withheld but for paging and form, unknown names withheld."""
    kept = []
    for pair in query.split("&"):
        raw_name, sep, raw_value = pair.partition("=")
        name, value = unquote_plus(raw_name).strip(), unquote_plus(raw_value)
        if not name:
            continue
        if name.lower() in _PLAIN_PARAMETERS:
            kept.append(
                f"{raw_name}={raw_value if _harmless(value) else WITHHELD}" if sep else raw_name
            )
        elif name in _API_PARAMETERS or _dicom_attribute(name):
            kept.append(f"{raw_name}={WITHHELD}" if sep else raw_name)
        else:
            kept.append(WITHHELD)
    return "&".join(kept)


def _trusted_path(method: str, route_path: str, status: int) -> bool:
    """Whether the request's own path may enter the trail. A retrieval answered with success
    named objects the index holds (de-identified UIDs, our share ids). A failure, a search
    (answered 200 with no match whatever UID its path names) or a STOW-RS path (the
    uploader's own, possibly original, Study Instance UID) may carry anything the caller
    sent: the route's template stands in for it."""
    if status >= 400 or not route_path:
        return False
    if "/dicom-web" in route_path:
        return method != "POST" and not route_path.endswith(("/studies", "/series", "/instances"))
    return True


def outcome_of(status: int) -> int:
    """EventOutcomeIndicator: 0 success, 4 minor failure (refused), 8 serious (server)."""
    if status < 400:
        return 0
    return 4 if status < 500 else 8


def to_dict(event: AuditEntry) -> dict[str, Any]:
    """An event as JSON, with the DICOM audit message names beside ours."""
    return {
        "id": event.event_id,
        "time": event.at.isoformat(),
        "action": event.action,
        "event_id": {
            "code": event.event_code,
            "scheme": "DCM",
            "meaning": EVENT_NAMES.get(event.event_code, ""),
        },
        "event_action_code": event.event_action,
        "event_outcome_indicator": event.outcome,
        "user_id": event.actor,
        "network_access_point_id": event.address,
        "user_agent": event.user_agent,
        "resource": event.resource,
        "study_instance_uid": event.study_instance_uid or None,
        "share_id": event.share_id or None,
        "status_code": event.status_code,
        "detail": json.loads(event.detail) if event.detail else None,
    }


_REFUSED_CREDENTIALS = {
    401: AuditAction.AUTH_FAILURE,
    429: AuditAction.AUTH_RATE_LIMITED,
    403: AuditAction.AUTH_FORBIDDEN,
}


def _action_for(endpoint: Any, status: int, path: str) -> str:
    """A refused credential as such; otherwise what the route declares it does (a request
    no route took: a look at a share, or a request to the API)."""
    refused = _REFUSED_CREDENTIALS.get(status)
    if refused is not None:
        return refused
    fallback = AuditAction.SHARE_VIEW if path.startswith("/s/") else AuditAction.API_REQUEST
    return str(getattr(endpoint, "audit_action", fallback))


class AuditMiddleware:
    """Writes one event per request to /dicom-web, /s/ and /api/ once the answer is sent
    (the client never waits for the audit write). Routes enrich it through
    `request.state.audit` (action, share_id, study, detail) and may add events of their
    own in `request.state.audit_extra`. Share tokens never reach the trail: the path keeps
    the share id instead. Nor do original identifiers a caller sends: query values are
    withheld (but for paging and format), and a path is kept only when it named what the
    index holds (see `_trusted_path`)."""

    def __init__(self, app: ASGIApp, writer: AuditWriter) -> None:
        self.app, self.writer = app, writer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith(("/dicom-web", "/s/", "/api/")) or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        status = StatusRecorder(send)
        try:
            await status.run(self.app, scope, receive)
        finally:
            self.writer.submit(self._events(scope, path, status.code))

    @staticmethod
    def _events(scope: Scope, path: str, status: int) -> list[AuditEntry]:
        state: dict[str, Any] = scope.get("state") or {}
        principal = state.get("principal")
        notes: dict[str, Any] = dict(state.get("audit") or {})
        share_id = notes.pop("share_id", None) or (
            principal.share.share_id if principal is not None and principal.share else ""
        )
        route = getattr(scope.get("route"), "path", "")
        trusted = _trusted_path(scope.get("method", ""), route, status)
        if not trusted:
            path = route or "(no such route)"
        if path.startswith("/s/"):  # the share's id (ours) in place of its token
            path = _SHARE_PATH.sub(f"/s/{share_id or '-'}", path)
        query = _withheld_query(scope.get("query_string", b"").decode("latin-1"))
        resource = (path + ("?" + query if query else ""))[:1024]
        headers = dict(scope.get("headers") or [])
        action = notes.pop("action", None)
        if action is None or status in (401, 429) and not action.startswith(("share.", "auth.")):
            action = _action_for(
                getattr(scope.get("route"), "endpoint", None), status, route or path
            )
        client = scope.get("client")
        detail = notes.pop("detail", None)
        study = notes.pop("study", None) or (
            (scope.get("path_params") or {}).get("study", "") if trusted else ""
        )
        common = {
            "address": client[0] if client else "",
            "user_agent": headers.get(b"user-agent", b"").decode("latin-1")[:512],
        }
        # A refused attempt names what it tried (`key:<id>` of an existing key), else anonymous.
        actor = principal.subject if principal is not None else notes.pop("actor", "anonymous")
        first = audit_entry(
            action,
            actor,
            outcome=outcome_of(status),
            resource=resource,
            status_code=status,
            study_instance_uid=str(study)[:64],
            share_id=share_id,
            detail=json.dumps(detail) if detail else "",
            **common,
        )
        extra = [
            AuditEntry(**{**e.__dict__, **common, "share_id": e.share_id or share_id})
            for e in state.get("audit_extra", [])
        ]
        return [first, *extra]


__all__ = [
    "INVALID_TOKENS",
    "KEY_FAILURES",
    "SHARE_FAILURES",
    "AuditMiddleware",
    "audited",
    "outcome_of",
    "to_dict",
]
