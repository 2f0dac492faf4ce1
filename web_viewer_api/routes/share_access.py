"""What a recipient's browser reaches: /s/{token} (the share's page: PIN form, studies,
download), /s/{token}/session (PIN -> viewer session cookie), /s/{token}/download (ZIP).

Pages are plain server-rendered HTML without third-party resources, under a strict CSP;
failures are pages too (404 unknown, 410 expired/revoked/used up, 403 locked, 429)."""

from __future__ import annotations

import html
import io
import zipfile
from collections.abc import Iterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Form, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel, Field

from storage import (
    InstanceQuery,
    ObjectNotFound,
    ObjectStore,
    SeriesQuery,
    ShareRecord,
    StudyQuery,
)
from web_viewer_api.auth import (
    Principal,
    ShareGate,
    ShareSessionRequired,
    needs_session,
    share_scope,
)
from web_viewer_api.deps import SHARE_COOKIE, client_address, current_principal
from web_viewer_api.errors import ApiError, Forbidden, NotFound
from web_viewer_api.shares import ShareService, WrongPin

router = APIRouter(prefix="/s/{share_token}", tags=["Share links"])

_CSP = ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'")
_PAGE_HEADERS = {"Content-Security-Policy": _CSP, "Cache-Control": "no-store",
                 "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff",
                 "X-Frame-Options": "DENY"}
_STYLE = ("body{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;"
          "color:#1d2430}h1{font-size:1.4rem}.study{border:1px solid #ccd;border-radius:6px;"
          "padding:.8rem;margin:.8rem 0}.series{display:inline-block;margin:.3rem;text-align:center;"
          "font-size:.8rem}.series img{display:block;width:128px;height:128px;background:#000}"
          ".error{color:#a00}button,a.button{font-size:1rem;padding:.4rem 1rem}")


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    document = (f"<!doctype html><html lang=\"fr\"><head><meta charset=\"utf-8\">"
                f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
                f"<meta name=\"robots\" content=\"noindex,nofollow\">"
                f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
                f"<body><h1>{html.escape(title)}</h1>{body}</body></html>")
    return HTMLResponse(document, status_code=status, headers=_PAGE_HEADERS)


_ERROR_PAGES = {
    404: "Lien introuvable / Link not found",
    410: "Lien expiré ou révoqué / Link expired or revoked",
    403: "Lien verrouillé / Link locked",
    429: "Trop de tentatives / Too many attempts",
}


def _error_page(exc: ApiError) -> HTMLResponse:
    title = _ERROR_PAGES.get(exc.status_code, "Erreur / Error")
    response = _page(title, f"<p>{html.escape(exc.message)}</p>"
                            "<p>Contactez l'expéditeur du lien. / Contact the sender of the link.</p>",
                     exc.status_code)
    response.headers.update(exc.headers)
    return response


def _gate(request: Request) -> ShareGate:
    gate: ShareGate | None = request.app.state.share_gate
    if gate is None:
        raise NotFound("not found")
    return gate


def _service(request: Request) -> ShareService:
    service: ShareService | None = request.app.state.share_service
    if service is None:
        raise NotFound("not found")
    return service


async def _find(request: Request, share_token: str) -> ShareRecord:
    try:
        share = await anyio.to_thread.run_sync(_gate(request).find, share_token,
                                               client_address(request))
    except NotFound:
        request.state.audit = {"action": "share.unknown_token"}
        raise
    request.state.audit = {"action": "share.view", "share_id": share.share_id}
    return share


def _secure(request: Request) -> bool:
    public = request.app.state.config.public_url or ""
    return request.url.scheme == "https" or public.startswith("https://")


def _session_cookie(response: Response, request: Request, share_token: str, session: str,
                    max_age: int) -> None:
    response.set_cookie(SHARE_COOKIE, session, max_age=max_age, path=f"/s/{share_token}",
                        httponly=True, samesite="strict", secure=_secure(request))


@router.get("", response_class=HTMLResponse, summary="The share's page (PIN form or studies)",
            include_in_schema=False)
async def share_page(share_token: str, request: Request) -> Response:
    try:
        share = await _find(request, share_token)
        if needs_session(share):
            try:
                principal = await current_principal(request)
            except ShareSessionRequired:
                return _open_form(share_token, share)
        else:
            principal = await current_principal(request)
        return await anyio.to_thread.run_sync(_studies_page, request, share_token, share, principal)
    except ApiError as exc:
        return _error_page(exc)


def _open_form(share_token: str, share: ShareRecord, error: str = "", status: int = 200) -> HTMLResponse:
    action = f"/s/{html.escape(share_token)}/session"
    message = f'<p class="error">{html.escape(error)}</p>' if error else ""
    if share.pin_hash is not None:
        form = (f'<form method="post" action="{action}"><label>Code PIN / PIN '
                '<input name="pin" type="password" inputmode="numeric" autocomplete="off" '
                'required autofocus maxlength="128"></label> <button type="submit">Ouvrir / Open'
                "</button></form>")
    else:
        form = (f'<form method="post" action="{action}"><button type="submit">'
                "Ouvrir les images / Open the images</button></form>")
    expiry = share.expires_at.strftime("%Y-%m-%d %H:%M UTC")
    return _page("Images médicales partagées / Shared medical images",
                 f"{message}<p>Valable jusqu'au / valid until {expiry}.</p>{form}", status)


def _studies_page(request: Request, share_token: str, share: ShareRecord,
                  principal: Principal) -> HTMLResponse:
    index = request.app.state.index
    scope = share_scope(share)
    root = f"/s/{html.escape(share_token)}"
    parts = []
    for study in index.search_studies(StudyQuery(limit=100, scope=scope)):
        series = index.search_series(SeriesQuery(study_instance_uid=study.study_instance_uid,
                                                 limit=1000, scope=scope))
        tiles = "".join(
            f'<span class="series"><img alt="" loading="lazy" src="{root}/dicom-web/studies/'
            f'{s.study_instance_uid}/series/{s.series_instance_uid}/thumbnail">'
            f"{html.escape(s.modality)} {s.series_number or ''} · {s.number_of_instances} im.<br>"
            f"{html.escape(s.series_description)}</span>" for s in series)
        date = study.study_date
        shown = f"{date[:4]}-{date[4:6]}-{date[6:]}" if len(date) == 8 else ""
        parts.append(f'<div class="study"><strong>{html.escape(shown)} '
                     f"{html.escape(study.study_description or 'Examen / Study')}</strong> "
                     f"({', '.join(map(html.escape, study.modalities_in_study))}, "
                     f"{study.number_of_instances} images)<div>{tiles}</div></div>")
    download = (f'<p><a class="button" href="{root}/download">Télécharger (ZIP, DICOM) / '
                "Download (ZIP, DICOM)</a></p>" if share.allow_download else "")
    body = ("".join(parts) or "<p>Aucune image disponible. / No images available.</p>") + download
    body += (f"<p>DICOMweb : <code>{html.escape(str(request.base_url).rstrip('/'))}{root}"
             "/dicom-web</code></p>")
    return _page("Images médicales partagées / Shared medical images", body)


class SessionOpened(BaseModel):
    expires_at: str


@router.post("/session", summary="Open a viewer session on a share (PIN when it has one)",
             responses={201: {"model": SessionOpened}}, include_in_schema=False)
async def open_session(share_token: str, request: Request,
                       pin: Annotated[str | None, Form(max_length=128)] = None) -> Response:
    """Form posts (the share page) get a redirect to the page; JSON callers get 201.
    The session cookie is HttpOnly, SameSite=Strict, limited to this share's path."""
    wants_json = "application/json" in request.headers.get("content-type", "")
    if wants_json:
        try:
            pin = PinBody.model_validate_json(await request.body()).pin
        except ValueError:
            return JSONResponse({"error": {"code": "bad_request", "message": "body: {\"pin\": \"...\"}"}},
                                status_code=400)
    try:
        share = await _find(request, share_token)
        request.state.audit = {"action": "share.session", "share_id": share.share_id}
        service = _service(request)
        session, expires = await anyio.to_thread.run_sync(
            service.open_session, share, pin, client_address(request))
    except WrongPin as exc:
        request.state.audit = {"action": "share.pin_failure", "share_id": share.share_id}
        if wants_json:
            return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status_code=401)
        return _open_form(share_token, share, exc.message, status=401)
    except ApiError as exc:
        if exc.status_code == 403 and "locked" in exc.message:
            request.state.audit = {"action": "share.locked"}
        if wants_json:
            return JSONResponse({"error": {"code": exc.code, "message": exc.message}},
                                status_code=exc.status_code, headers=exc.headers)
        return _error_page(exc)
    max_age = max(1, int((expires - service.clock()).total_seconds()))
    response: Response
    if wants_json:
        response = JSONResponse({"expires_at": expires.isoformat()}, status_code=201,
                                headers={"Cache-Control": "no-store"})
    else:
        response = RedirectResponse(f"/s/{share_token}", status_code=303)
    _session_cookie(response, request, share_token, session, max_age)
    return response


class PinBody(BaseModel):
    pin: str | None = Field(None, max_length=128)


@router.get("/download", summary="The shared studies as a ZIP of DICOM files",
            include_in_schema=False)
async def download(share_token: str, request: Request) -> Response:
    try:
        share = await _find(request, share_token)
        principal = await current_principal(request)
        if not share.allow_download:
            raise Forbidden("this share allows viewing, not downloading")
    except ApiError as exc:
        return _error_page(exc)
    request.state.audit = {"action": "share.download", "share_id": share.share_id}
    index = request.app.state.index
    instances = await anyio.to_thread.run_sync(lambda: index.search_instances(
        InstanceQuery(limit=1_000_000, scope=principal.scope)))
    studies = {s.study_instance_uid: s for s in await anyio.to_thread.run_sync(
        lambda: index.search_studies(StudyQuery(limit=1000, scope=principal.scope)))}
    names = []
    for number, instance in enumerate(instances, start=1):
        study = studies.get(instance.study_instance_uid)
        folder = f"{study.study_date if study else ''}_{instance.study_instance_uid}".lstrip("_")
        names.append(((f"{folder}/{instance.modality or 'OT'}_{instance.series_instance_uid}/"
                      f"{instance.instance_number or number:05d}_{instance.sop_instance_uid}.dcm"),
                      instance.object_key))
    return StreamingResponse(
        zip_stream(request.app.state.store, names), media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="share-{share.share_id}.zip"',
                 "Cache-Control": "no-store"})


class _Sink(io.RawIOBase):
    """A write-only, unseekable sink: zipfile then writes data descriptors and we stream."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.chunks.append(bytes(data))
        return len(data)

    def drain(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        return data


def zip_stream(store: ObjectStore, entries: list[tuple[str, str]]) -> Iterator[bytes]:
    """A ZIP (stored, ZIP64) of the objects, one instance in memory at a time."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, key in entries:
            try:
                body = store.get(key)
            except ObjectNotFound:
                continue  # indexed but gone: reindex will tell
            with archive.open(zipfile.ZipInfo(name, date_time=(2000, 1, 1, 0, 0, 0)), "w",
                              force_zip64=True) as member:
                member.write(body)
            yield sink.drain()
    yield sink.drain()

