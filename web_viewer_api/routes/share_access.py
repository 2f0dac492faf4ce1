"""What a recipient's browser reaches: /s/{token} (PIN prompt, then the viewer),
/s/{token}/session (PIN -> viewer session cookie), /s/{token}/download (ZIP).

Failures are pages too (404 unknown, 410 expired/revoked/used up, 403 locked, 429);
see `web_viewer_api.pages`."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable, Iterator
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

from access import AuditAction, Permission, needs_session, share_scope
from access.errors import ShareEnded, ShareError, ShareLocked, WrongPin
from access.shares import ShareService
from access.tokens import sha256_hex
from storage import (
    InstanceQuery,
    ObjectNotFound,
    ObjectStore,
    QueryRetrieve,
    SeriesQuery,
    ShareRecord,
    StudyQuery,
)
from web_viewer_api.auth import (
    ShareGate,
    ShareSessionRequired,
    UnknownShareToken,
)
from web_viewer_api.deps import SHARE_COOKIE, client_address, current_principal
from web_viewer_api.errors import ApiError, Forbidden, NotFound, as_api_error
from web_viewer_api.media import MediaFileSet
from web_viewer_api.pages import (
    SeriesEntry,
    StudyEntry,
    error_page,
    language,
    open_form,
    viewer_shell,
)

router = APIRouter(prefix="/s/{share_token}", tags=["Share links"])


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
        share = await anyio.to_thread.run_sync(
            _gate(request).find, share_token, client_address(request)
        )
    except UnknownShareToken:
        request.state.audit = {"action": AuditAction.SHARE_UNKNOWN_TOKEN}
        raise
    request.state.audit = {"action": AuditAction.SHARE_VIEW, "share_id": share.share_id}
    return share


def _secure(request: Request) -> bool:
    public = request.app.state.config.public_url or ""
    return request.url.scheme == "https" or public.startswith("https://")


def _session_cookie(
    response: Response, request: Request, share_token: str, session: str, max_age: int
) -> None:
    response.set_cookie(
        SHARE_COOKIE,
        session,
        max_age=max_age,
        path=f"/s/{share_token}",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


@router.get(
    "",
    response_class=HTMLResponse,
    summary="The share's page: PIN prompt or viewer",
    include_in_schema=False,
)
async def share_page(share_token: str, request: Request) -> Response:
    try:
        share = await _find(request, share_token)
        if needs_session(share):
            try:
                await current_principal(request)  # the session, when the share needs one
            except ShareSessionRequired:
                if (
                    share.max_uses is not None
                    and share.uses >= share.max_uses
                    and not await anyio.to_thread.run_sync(_may_reopen, request, share)
                ):
                    raise ShareEnded(
                        "this share link has been used the maximum number of times"
                    ) from None
                return open_form(request, share_token, share)
        else:
            await current_principal(request)
        studies = await anyio.to_thread.run_sync(_study_list, request, share)
        return viewer_shell(request, share_token, share, studies)
    except ShareError as exc:
        return error_page(request, as_api_error(exc))
    except ApiError as exc:
        return error_page(request, exc)


def _may_reopen(request: Request, share: ShareRecord) -> bool:
    """The browser holds the cookie of an ended session of this share: it may reopen it
    (with the PIN, when there is one) without spending a use."""
    cookie = request.cookies.get(SHARE_COOKIE)
    service = _service(request)
    return cookie is not None and service.access.may_reopen(
        sha256_hex(cookie), share.share_id, service.clock()
    )


def _study_list(request: Request, share: ShareRecord) -> list[StudyEntry]:
    """The studies, for browsers without JavaScript."""
    index = request.app.state.index
    scope = share_scope(share)
    service = QueryRetrieve(index)
    withheld: dict[str, int] = {}
    for row in index.withheld(scope):
        withheld[row.study_instance_uid] = withheld.get(row.study_instance_uid, 0) + row.count
    studies = []
    for study in service.search_for_studies(scope, StudyQuery(limit=100)):
        series = service.search_for_series(
            scope, SeriesQuery(study_instance_uid=study.study_instance_uid, limit=1000)
        )
        date = study.study_date
        studies.append(
            StudyEntry(
                uid=study.study_instance_uid,
                date=f"{date[:4]}-{date[4:6]}-{date[6:]}" if len(date) == 8 else "",
                description=study.study_description,
                modalities=tuple(study.modalities_in_study),
                count=study.number_of_instances,
                withheld=withheld.get(study.study_instance_uid, 0),
                series=tuple(
                    SeriesEntry(
                        s.series_instance_uid,
                        s.modality,
                        str(s.series_number or ""),
                        s.number_of_instances,
                        s.series_description,
                    )
                    for s in series
                ),
            )
        )
    return studies


class WithheldPart(BaseModel):
    modality: str
    reason: str = Field(description="pixels_may_identify, too_large or not_deidentifiable")
    count: int


class Withheld(BaseModel):
    #: Study Instance UID -> what of it its site withheld (no value of the instances).
    studies: dict[str, list[WithheldPart]]


@router.get(
    "/withheld",
    summary="What the producing sites withheld of the shared studies",
    response_model=Withheld,
    include_in_schema=False,
)
async def withheld(share_token: str, request: Request) -> Response:
    """Instances of the shared studies that their site kept in quarantine, counted by
    modality and reason category: the viewer tells the recipient that part of a study is
    missing, and why, without anything that identifies."""
    await _find(request, share_token)  # errors: the registered JSON handlers
    principal = await current_principal(request)
    rows = await anyio.to_thread.run_sync(request.app.state.index.withheld, principal.scope)
    studies: dict[str, list[WithheldPart]] = {}
    for row in rows:
        studies.setdefault(row.study_instance_uid, []).append(
            WithheldPart(modality=row.modality, reason=row.reason, count=row.count)
        )
    return JSONResponse(
        Withheld(studies=studies).model_dump(), headers={"Cache-Control": "no-store"}
    )


class SessionOpened(BaseModel):
    expires_at: str


@router.post(
    "/session",
    summary="Open a viewer session on a share (PIN when it has one)",
    responses={201: {"model": SessionOpened}},
    include_in_schema=False,
)
async def open_session(
    share_token: str, request: Request, pin: Annotated[str | None, Form(max_length=128)] = None
) -> Response:
    """Form posts (the share page) get a redirect to the page; JSON callers get 201.
    The session cookie is HttpOnly, SameSite=Strict, limited to this share's path."""
    wants_json = "application/json" in request.headers.get("content-type", "")
    if wants_json:
        try:
            pin = PinBody.model_validate_json(await request.body()).pin
        except ValueError:
            return JSONResponse(
                {"error": {"code": "bad_request", "message": 'body: {"pin": "..."}'}},
                status_code=400,
            )
    try:
        share = await _find(request, share_token)
        request.state.audit = {"action": AuditAction.SHARE_SESSION, "share_id": share.share_id}
        service = _service(request)
        session, expires = await anyio.to_thread.run_sync(
            service.open_session, share, pin, request.cookies.get(SHARE_COOKIE)
        )
    except WrongPin as exc:
        request.state.audit = {"action": AuditAction.SHARE_PIN_FAILURE, "share_id": share.share_id}
        if wants_json:
            answer = as_api_error(exc)
            return JSONResponse(
                {"error": {"code": answer.code, "message": answer.message}}, status_code=401
            )
        return open_form(request, share_token, share, exc.message, status=401)
    except (ApiError, ShareError) as refused:
        if isinstance(refused, ShareLocked):
            request.state.audit = {
                **(getattr(request.state, "audit", None) or {}),
                "action": AuditAction.SHARE_LOCKED,
            }
        answer = as_api_error(refused) if isinstance(refused, ShareError) else refused
        if wants_json:
            return JSONResponse(
                {"error": {"code": answer.code, "message": answer.message}},
                status_code=answer.status_code,
                headers=answer.headers,
            )
        return error_page(request, answer)
    # The cookie lives as long as the share: the server ends the session (idle time), and a
    # browser that still holds it may reopen it later without spending a use.
    max_age = max(1, int((share.expires_at - service.clock()).total_seconds()))
    response: Response
    if wants_json:
        response = JSONResponse(
            {"expires_at": expires.isoformat()},
            status_code=201,
            headers={"Cache-Control": "no-store"},
        )
    else:
        response = RedirectResponse(f"/s/{share_token}?lang={language(request)}", status_code=303)
    _session_cookie(response, request, share_token, session, max_age)
    return response


class PinBody(BaseModel):
    pin: str | None = Field(None, max_length=128)


@router.get(
    "/download", summary="The shared studies as a ZIP of DICOM files", include_in_schema=False
)
async def download(share_token: str, request: Request) -> Response:
    try:
        share = await _find(request, share_token)
        principal = await current_principal(request)
        if Permission.DOWNLOAD not in share.permissions:
            raise Forbidden("this share allows viewing, not downloading")
    except ShareError as exc:
        return error_page(request, as_api_error(exc))
    except ApiError as exc:
        return error_page(request, exc)
    request.state.audit = {"action": AuditAction.SHARE_DOWNLOAD, "share_id": share.share_id}
    service = QueryRetrieve(request.app.state.index)
    instances = await anyio.to_thread.run_sync(
        lambda: service.search_for_instances(principal.scope, InstanceQuery(limit=1_000_000))
    )
    keys = [instance.object_key for instance in instances]
    gate, interval = _gate(request), request.app.state.config.share_liveness_seconds
    return StreamingResponse(
        zip_stream(request.app.state.store, gate.while_live(share.share_id, keys, interval)),
        media_type="application/zip",
        headers={
            "Content-Disposition": f'attachment; filename="share-{share.share_id}.zip"',
            "Cache-Control": "no-store",
        },
    )


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


def zip_stream(store: ObjectStore, keys: Iterable[str]) -> Iterator[bytes]:
    """A ZIP (stored, ZIP64) of the objects as a DICOM File-set with its DICOMDIR (see
    `web_viewer_api.media`), one instance in memory at a time. Entry names are File IDs the
    File-set makes (`PT000000/ST000000/SE000000/IM000000`), never attribute values, so no
    name can make an unpacker write outside its folder."""
    sink = _Sink()
    media = MediaFileSet()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key in keys:
            try:
                body = store.get(key)
            except ObjectNotFound:
                continue  # indexed but gone: reindex will tell
            file_id = media.add(body)
            if file_id is None:
                continue  # the same instance twice: once in the File-set
            _member(archive, file_id, body)
            yield sink.drain()
        _member(archive, "DICOMDIR", media.dicomdir())
    yield sink.drain()


def _member(archive: zipfile.ZipFile, name: str, body: bytes) -> None:
    with archive.open(
        zipfile.ZipInfo(name, date_time=(2000, 1, 1, 0, 0, 0)), "w", force_zip64=True
    ) as member:
        member.write(body)
