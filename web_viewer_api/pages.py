"""The HTML a recipient's browser gets for a share: PIN prompt, error pages and the viewer
shell, in French or English (browser language, `?lang=fr|en` to switch). Plain server-side
HTML under a strict Content-Security-Policy: no inline script, nothing from elsewhere."""

from __future__ import annotations

import datetime as dt
import html
import re

from fastapi import Request
from fastapi.responses import HTMLResponse

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


def page(
    lang: str,
    title: str,
    body: str,
    status: int = 200,
    *,
    path: str = "",
    head: str = "",
    body_class: str = "page",
) -> HTMLResponse:
    other = "en" if lang == "fr" else "fr"
    switch = (
        (
            f'<a class="lang" href="{html.escape(path)}?lang={other}" hreflang="{other}">'
            f"{TEXT[lang]['switch']}</a>"
        )
        if path
        else ""
    )
    document = (
        f'<!doctype html><html lang="{lang}"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<meta name="robots" content="noindex,nofollow"><link rel="icon" href="data:,">'
        '<link rel="stylesheet" href="/static/viewer/viewer.css">'
        f"<title>{html.escape(title)}</title>{head}</head>"
        f'<body class="{body_class}">{switch}{body}</body></html>'
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
    lang = language(request)
    text = TEXT[lang]
    reason = _reason(exc)
    title = text["not_found"] if reason == "not_found" else text[reason]
    body = (
        f"<main><h1>{html.escape(title)}</h1>"
        + (f"<p>{text['not_found_body']}</p>" if reason == "not_found" else "")
        + f"<p>{text['contact']}</p></main>"
    )
    response = page(lang, title, body, exc.status_code, path=request.url.path)
    response.headers.update(exc.headers)
    return response


def _when(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _note(lang: str, share: ShareRecord) -> str:
    if not share.note:
        return ""
    return (
        f'<aside class="note"><strong>{TEXT[lang]["note"]}</strong>'
        f"<p>{html.escape(share.note)}</p></aside>"
    )


def open_form(
    request: Request, share_token: str, share: ShareRecord, error: str = "", status: int = 200
) -> HTMLResponse:
    """The PIN prompt, or the button that opens a use-limited share: nothing of the share
    but its expiry (no note, no recipient, no study)."""
    lang = language(request)
    text = TEXT[lang]
    action = f"/s/{html.escape(share_token)}/session?lang={lang}"
    message = ""
    if error:
        left = re.search(r"\((\d+) attempt", error)
        message = (
            f'<p class="error" role="alert">{text["wrong_pin"]}'
            + (f" — {left.group(1)} {text['attempts_left']}" if left else "")
            + "</p>"
        )
    if share.pin_hash is not None:
        form = (
            f'<form method="post" action="{action}"><label for="pin">{text["pin"]}</label> '
            '<input id="pin" name="pin" type="password" inputmode="numeric" '
            'autocomplete="off" required autofocus maxlength="128"> '
            f'<button type="submit">{text["open"]}</button></form>'
        )
    else:
        form = (
            f'<form method="post" action="{action}">'
            f'<button type="submit">{text["open"]}</button></form>'
        )
    # The sender's note is for the recipient: shown once the PIN (or the button of a
    # use-limited share) has opened a session, never to whoever merely holds the link.
    body = (
        f"<main><h1>{text['title']}</h1>{message}"
        f"<p>{text['valid_until']} {_when(share.expires_at)}</p>{form}</main>"
    )
    # The link's fragment (a sealed context's key) is kept in this tab for the viewer:
    # the form's answer is a redirect, and a redirect does not carry it.
    head = '<script type="module" src="/static/viewer/keep-key.js"></script>'
    return page(lang, text["title"], body, status, path=request.url.path, head=head)


def viewer_shell(
    request: Request, share_token: str, share: ShareRecord, fallback: str
) -> HTMLResponse:
    """The viewer (only once the share's session is open, when it needs one): static script
    and style, the share's facts (the sender's note among them) as data attributes, and the
    server-rendered study list for browsers without JavaScript."""
    lang = language(request)
    text = TEXT[lang]
    root = f"/s/{share_token}"
    attributes = {
        "data-root": root,
        "data-lang": lang,
        "data-expires": share.expires_at.isoformat(),
        "data-note": share.note,
        "data-download": "1" if share.allow_download else "",
        # Ciphertext: the key is in the link's fragment, read by the viewer, never sent here.
        "data-context": share.sealed_context,
        "data-uses": "" if share.max_uses is None else f"{share.uses}/{share.max_uses}",
    }
    data = " ".join(f'{name}="{html.escape(value)}"' for name, value in attributes.items())
    body = (
        f'<div id="viewer" {data}><p class="loading">{text["loading"]}</p></div>'
        f"<noscript><main>{_note(lang, share)}<p>{text['noscript']}</p>{fallback}</main></noscript>"
    )
    head = '<script type="module" src="/static/viewer/viewer.js"></script>'
    return page(lang, text["title"], body, path="", head=head, body_class="viewer-page")


__all__ = [
    "CSP",
    "LANGUAGES",
    "TEXT",
    "error_page",
    "language",
    "open_form",
    "page",
    "viewer_shell",
]
