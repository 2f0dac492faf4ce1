"""A share's refusals are the domain's (access.errors), never HTTP errors:
the service raises them for the API and the CLI alike, and the API maps each kind once."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from storage import AccessRepository, IndexRepository, create_index_engine, migrate
from web_viewer_api.errors import ApiError, as_api_error
from access.errors import (
    InvalidShareRequest,
    PinCheckBusy,
    ShareEnded,
    ShareError,
    ShareLocked,
    ShareNotFound,
    WrongPin,
)
from access.shares import SharePolicy, ShareRequest, ShareService


@pytest.mark.parametrize(("error", "status", "code"), [
    (InvalidShareRequest("pin: 4 to 128 characters"), 400, "bad_request"),
    (ShareNotFound("no such share"), 404, "not_found"),
    (ShareEnded("this share link has expired"), 410, "gone"),
    (ShareLocked("this share link is locked after too many wrong PINs"), 403, "forbidden"),
    (WrongPin("wrong PIN (2 attempts left)"), 401, "wrong_pin"),
    (PinCheckBusy("other PIN attempts on this share are being checked", retry_after=1), 429,
     "rate_limited"),
])
def test_each_refusal_is_answered_once_with_its_status(error: ShareError, status: int,
                                                       code: str) -> None:
    answer = as_api_error(error)
    assert (answer.status_code, answer.code, answer.message) == (status, code, error.message)
    if isinstance(error, PinCheckBusy):
        assert answer.headers == {"Retry-After": "1"}


def test_the_service_raises_the_domain_s_errors_not_http_ones(tmp_path: Path) -> None:
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    migrate(engine)
    service = ShareService(AccessRepository(engine), IndexRepository(engine), SharePolicy())
    request = ShareRequest(study_uids=("2.25.1",), expires_in=dt.timedelta(hours=1),
                           created_by="test", pin="12")
    with pytest.raises(InvalidShareRequest) as short_pin:
        service.create(request, "http://127.0.0.1")
    assert not isinstance(short_pin.value, ApiError)
    with pytest.raises(ShareNotFound):
        service.create(ShareRequest(study_uids=("2.25.1",), expires_in=dt.timedelta(hours=1),
                                    created_by="test"), "http://127.0.0.1")
    with pytest.raises(ShareNotFound):
        service.revoke("0123456789abcdef")
