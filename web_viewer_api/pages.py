"""The HTML a recipient's browser gets for a share: PIN prompt, error pages and the viewer
shell, in French or English (browser language, `?lang=fr|en` to switch). Plain server-side
HTML under a strict Content-Security-Policy: no inline script, nothing from elsewhere."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse

from access import Permission
from storage import ShareRecord
from web_viewer_api.errors import ApiError

LANGUAGES = ("fr", "en")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}

TEXT: dict[str, dict[str, str]] = {
    "fr": {
        "title": "Images médicales partagées",
        "not_found": "Lien introuvable",
        "not_found_body": "Ce lien n'existe pas ou n'est plus valable.",
        "expired": "Ce lien a expiré",
        "revoked": "Ce lien a été révoqué par l'expéditeur",
        "used_up": "Ce lien a été utilisé le nombre maximal de fois",
        "locked": "Ce lien est verrouillé après trop de codes PIN erronés",
        "rate_limited": "Trop de tentatives depuis votre adresse. Réessayez plus tard.",
        "forbidden": "Cette action n'est pas permise par ce partage.",
        "error": "Erreur",
        "contact": "Contactez l'expéditeur du lien pour en obtenir un nouveau.",
        "pin": "Code PIN",
        "open": "Ouvrir les images",
        "wrong_pin": "Code PIN erroné",
        "attempts_left": "tentative(s) restante(s)",
        "valid_until": "Valable jusqu'au",
        "note": "Message de l'expéditeur",
        "switch": "English",
        "noscript": "Le visualiseur a besoin de JavaScript. Voici la liste des examens :",
        "loading": "Chargement…",
        "withheld": "%d image(s) non transmise(s) par le site producteur (voir le visualiseur).",
    },
    "en": {
        "title": "Shared medical images",
        "not_found": "Link not found",
        "not_found_body": "This link does not exist or is no longer valid.",
        "expired": "This link has expired",
        "revoked": "This link was revoked by its sender",
        "used_up": "This link has been used the maximum number of times",
        "locked": "This link is locked after too many wrong PINs",
        "rate_limited": "Too many attempts from your address. Try again later.",
        "forbidden": "This share does not allow that.",
        "error": "Error",
        "contact": "Ask the sender of the link for a new one.",
        "pin": "PIN",
        "open": "Open the images",
        "wrong_pin": "Wrong PIN",
        "attempts_left": "attempt(s) left",
        "valid_until": "Valid until",
        "note": "Sender's note",
        "switch": "Français",
        "noscript": "The viewer needs JavaScript. The studies:",
        "loading": "Loading…",
        "withheld": "%d image(s) not sent by the producing site (see the viewer).",
    },
}


def language(request: Request) -> str:
    """`?lang=` first, then the browser's Accept-Language preference, else French."""
    asked = request.query_params.get("lang", "")
    if asked in LANGUAGES:
        return asked
    best, best_q = "fr", -1.0
    for entry in request.headers.get("accept-language", "").split(","):
        tag, _, params = entry.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        primary = tag.split("-")[0].lower()
        if primary in LANGUAGES and q > best_q:
            best, best_q = primary, q
    return best


_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("web_viewer_api", "templates"),
    autoescape=True,  # every value is escaped unless a template says otherwise (none does)
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
)


def page(
    request: Request,
    template: str,
    *,
    title: str,
    status: int = 200,
    switch: bool = True,
    body_class: str = "page",
    **values: Any,
) -> HTMLResponse:
    """A page from `templates/`, in the request's language, with the security headers."""
    lang = language(request)
    document = _TEMPLATES.get_template(template).render(
        lang=lang,
        other="en" if lang == "fr" else "fr",
        text=TEXT[lang],
        title=title,
        path=request.url.path if switch else "",
        body_class=body_class,
        **values,
    )
    return HTMLResponse(document, status_code=status, headers=PAGE_HEADERS)


def _reason(exc: ApiError) -> str:
    message = exc.message.lower()
    for key in ("expired", "revoked", "locked"):
        if key in message:
            return key
    if "maximum number" in message:
        return "used_up"
    return {404: "not_found", 429: "rate_limited", 403: "forbidden"}.get(exc.status_code, "error")


def error_page(request: Request, exc: ApiError) -> HTMLResponse:
    """404 says nothing of why (unknown, never existed); a known link says what happened."""
    reason = _reason(exc)
    response = page(
        request,
        "error.html",
        title=TEXT[language(request)][reason],
        status=exc.status_code,
        reason=reason,
    )
    response.headers.update(exc.headers)
    return response


def _when(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def open_form(
    request: Request, share_token: str, share: ShareRecord, error: str = "", status: int = 200
) -> HTMLResponse:
    """The PIN prompt, or the button that opens a use-limited share: nothing of the share
    but its expiry (no note, no recipient, no study). The sender's note is shown only once
    the PIN (or a use-limited share) has opened a session, never to whoever merely holds
    the link."""
    left = re.search(r"\((\d+) attempt", error) if error else None
    return page(
        request,
        "open.html",
        title=TEXT[language(request)]["title"],
        status=status,
        error=bool(error),
        attempts_left=left.group(1) if left else "",
        expires=_when(share.expires_at),
        with_pin=share.pin_hash is not None,
        action=f"/s/{share_token}/session?lang={language(request)}",
    )


@dataclass(frozen=True)
class SeriesEntry:
    uid: str
    modality: str
    number: str
    count: int
    description: str


@dataclass(frozen=True)
class StudyEntry:
    """A study of the no-JavaScript list."""

    uid: str
    date: str
    description: str
    modalities: tuple[str, ...]
    count: int
    withheld: int
    series: tuple[SeriesEntry, ...]


def viewer_shell(
    request: Request, share_token: str, share: ShareRecord, studies: list[StudyEntry]
) -> HTMLResponse:
    """The viewer (only once the share's session is open, when it needs one): static script
    and style, the share's facts (the sender's note among them) as data attributes, and the
    study list for browsers without JavaScript."""
    root = f"/s/{share_token}"
    attributes = {
        "data-root": root,
        "data-lang": language(request),
        "data-expires": share.expires_at.isoformat(),
        "data-note": share.note,
        # What the share allows beyond viewing (access.Permission names, space-separated).
        "data-permissions": " ".join(sorted(share.permissions)),
        # Ciphertext: the key is in the link's fragment, read by the viewer, never sent here.
        "data-context": share.sealed_context,
        "data-uses": "" if share.max_uses is None else f"{share.uses}/{share.max_uses}",
    }
    return page(
        request,
        "viewer.html",
        title=TEXT[language(request)]["title"],
        switch=False,
        body_class="viewer-page",
        attributes=attributes,
        note=share.note,
        studies=studies,
        root=root,
        download=Permission.DOWNLOAD in share.permissions,
    )


__all__ = [
    "CSP",
    "LANGUAGES",
    "TEXT",
    "SeriesEntry",
    "StudyEntry",
    "error_page",
    "language",
    "open_form",
    "page",
    "viewer_shell",
]
