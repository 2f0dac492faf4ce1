"""The audit trail's vocabulary: what is audited (`AuditAction`), as which DICOM audit event
(PS3.15 A.5: EventID code, EventActionCode), and one event built from them. The API, the CLI,
the node and the worker write the same events (`storage.AuditWriter` stores them)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from storage import DIMSE_ACTIONS, WORKER_ACTIONS, AuditEntry

#: DCM EventID codes (PS3.16 CID 400) by meaning.
EVENT_NAMES = {
    "110103": "DICOM Instances Accessed",
    "110104": "DICOM Instances Transferred",
    "110106": "Export",
    "110107": "Import",
    "110112": "Query",
    "110113": "Security Alert",
    "110114": "User Authentication",
    "110136": "Security Roles Changed",
}


class AuditAction(StrEnum):
    """What the API audits; each route says which of these it does (`audited`), a route
    may refine it (`request.state.audit`), and the middleware names only what it sees
    itself: a refused credential (401, 403, 429)."""

    DICOMWEB_SEARCH = "dicomweb.search"
    DICOMWEB_RETRIEVE = "dicomweb.retrieve"
    DICOMWEB_STORE = "dicomweb.store"
    SHARE_CREATE = "share.create"
    SHARE_LIST = "share.list"
    SHARE_INSPECT = "share.inspect"
    SHARE_REVOKE = "share.revoke"
    SHARE_VIEW = "share.view"
    SHARE_SESSION = "share.session"
    SHARE_PIN_FAILURE = "share.pin_failure"
    SHARE_LOCKED = "share.locked"
    SHARE_UNKNOWN_TOKEN = "share.unknown_token"  # nosec B105 - an audit action name, not a secret
    SHARE_DOWNLOAD = "share.download"
    SHARE_NOTIFY = "share.notify"
    STUDY_LOOKUP = "study.lookup"
    AUDIT_READ = "audit.read"
    AUTH_FAILURE = "auth.failure"
    AUTH_INVALID_TOKEN = "auth.invalid_token"  # nosec B105 - an audit action name, not a secret
    AUTH_KEY_FAILURE = "auth.key_failure"
    AUTH_RATE_LIMITED = "auth.rate_limited"
    AUTH_FORBIDDEN = "auth.forbidden"
    APIKEY_CREATE = "apikey.create"
    APIKEY_REVOKE = "apikey.revoke"
    API_REQUEST = "api.request"


#: Our action -> (EventID code, EventActionCode C/R/U/D/E).
ACTIONS: Mapping[str, tuple[str, str]] = {
    AuditAction.DICOMWEB_SEARCH: ("110112", "E"),
    AuditAction.DICOMWEB_RETRIEVE: ("110103", "R"),
    AuditAction.DICOMWEB_STORE: ("110107", "C"),
    AuditAction.SHARE_CREATE: ("110106", "C"),
    AuditAction.SHARE_LIST: ("110112", "E"),
    AuditAction.SHARE_INSPECT: ("110112", "E"),
    AuditAction.SHARE_REVOKE: ("110106", "D"),
    AuditAction.SHARE_VIEW: ("110103", "R"),
    AuditAction.SHARE_SESSION: ("110114", "E"),
    AuditAction.SHARE_PIN_FAILURE: ("110114", "E"),
    AuditAction.SHARE_LOCKED: ("110113", "E"),
    AuditAction.SHARE_UNKNOWN_TOKEN: ("110113", "E"),
    AuditAction.SHARE_DOWNLOAD: ("110106", "R"),
    AuditAction.SHARE_NOTIFY: ("110106", "E"),
    AuditAction.STUDY_LOOKUP: ("110112", "E"),
    AuditAction.AUDIT_READ: ("110112", "E"),
    AuditAction.AUTH_FAILURE: ("110114", "E"),
    AuditAction.AUTH_INVALID_TOKEN: ("110114", "E"),
    AuditAction.AUTH_KEY_FAILURE: ("110114", "E"),
    AuditAction.AUTH_RATE_LIMITED: ("110113", "E"),
    AuditAction.AUTH_FORBIDDEN: ("110113", "E"),
    AuditAction.APIKEY_CREATE: ("110136", "C"),
    AuditAction.APIKEY_REVOKE: ("110136", "D"),
    AuditAction.API_REQUEST: ("110112", "E"),
    # C-STORE, C-FIND, C-MOVE, C-GET, Storage Commitment: written by the node.
    **DIMSE_ACTIONS,
    # Written by the worker: a different instance under stored UIDs (the original stays).
    **WORKER_ACTIONS,
}


def audit_entry(
    action: str, actor: str, *, outcome: int = 0, at: dt.datetime | None = None, **fields: Any
) -> AuditEntry:
    code, verb = ACTIONS[action]
    return AuditEntry(
        at=at or dt.datetime.now(dt.UTC),
        action=action,
        event_code=code,
        event_action=verb,
        outcome=outcome,
        actor=actor[:300],
        **fields,
    )


__all__ = ["ACTIONS", "EVENT_NAMES", "AuditAction", "audit_entry"]
