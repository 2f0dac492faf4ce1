"""Authentication (API keys, OIDC against a real JWKS endpoint), brute-force limits, the
audit trail, e-mail notification (aiosmtpd on loopback) and the CLI for shares and keys."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pydicom
import pytest
from aiosmtpd.controller import Controller
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from access import new_api_key, sha256_hex
from gateway.sample_study import SampleStudySpec, write_sample_study
from storage import ApiKeyRecord, StudyQuery, create_index_engine, migrate
from tests.support.dicomweb_server import TOKEN, DicomwebServer
from tests.support.services import free_port
from web_viewer_api import OidcConfig, SmtpConfig
from web_viewer_api.loop_reads import InlineReads

ADMIN = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Accept": "application/dicom+json"}
ISSUER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


class _Issuer:
    """A minimal OIDC issuer on loopback: discovery document and JWKS."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/realms/test"
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(ISSUER_KEY.public_key()))
        documents = {
            "/realms/test/.well-known/openid-configuration": {
                "issuer": self.url, "jwks_uri": f"{self.url}/certs"},
            "/realms/test/certs": {"keys": [{**public, "kid": "k1", "use": "sig", "alg": "RS256"}]},
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = json.dumps(documents.get(self.path, {})).encode()
                self.send_response(200 if self.path in documents else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, key: Any = ISSUER_KEY, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": self.url, "aud": "dicom-gateway", "sub": "psc-8000000001", "iat": now,
                "exp": now + 300, "scope": "openid", "roles": ["radiologue"], **claims}
        return jwt.encode(body, key, algorithm="RS256", headers={"kid": "k1"})


class _Mailbox:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append(envelope.content)
        return "250 OK"


@pytest.fixture(scope="module")
def issuer() -> Iterator[_Issuer]:
    running = _Issuer()
    yield running
    running.server.shutdown()


@pytest.fixture(scope="module")
def mailbox() -> Iterator[tuple[_Mailbox, int]]:
    box, port = _Mailbox(), free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    yield box, port
    controller.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, issuer: _Issuer,
           mailbox: tuple[_Mailbox, int]) -> Iterator[DicomwebServer]:
    config = {
        "oidc": OidcConfig(issuer=issuer.url, audience="dicom-gateway", scope_claim="roles",
                           scope_map={"radiologue": ("read", "share"), "admin-imagerie": ("admin",)}),
        "smtp": SmtpConfig(host="127.0.0.1", port=mailbox[1], starttls=False,
                           sender="gateway@chu.example"),
    }
    with DicomwebServer(tmp_path_factory.mktemp("auth"), studies=2, **config) as running:
        yield running


def _key(server: DicomwebServer, scopes: set[str], site: str | None = None,
         sites: set[str] | None = None) -> tuple[str, str]:
    key_id, key = new_api_key()
    limited = frozenset(sites) if sites is not None else frozenset({site}) if site else None
    server.access.add_api_key(ApiKeyRecord(key_id, "test", frozenset(scopes), limited,
                                           dt.datetime.now(dt.UTC), None, sha256_hex(key)))
    return key_id, key


def test_api_key_scopes_are_enforced(server: DicomwebServer) -> None:
    _, reader = _key(server, {"read"})
    auth = {"Authorization": f"Bearer {reader}"}
    assert httpx.get(f"{server.url}/studies", headers={**auth, **JSON}).status_code == 200
    stow = httpx.post(f"{server.url}/studies", headers={**auth, "Content-Type": "application/dicom"},
                      content=b"x")
    assert stow.status_code == 403 and stow.json()["error"]["code"] == "forbidden"
    assert httpx.get(f"{server.root}/api/shares", headers=auth).status_code == 403
    assert httpx.get(f"{server.root}/api/audit", headers=auth).status_code == 403


def test_revoked_or_forged_api_key_is_401_with_a_challenge(server: DicomwebServer) -> None:
    key_id, key = _key(server, {"read"})
    server.access.revoke_api_key(key_id, dt.datetime.now(dt.UTC))
    for presented in (key, key[:-4] + "AAAA", "dgw_0123456789abcdef_nothing"):
        answer = httpx.get(f"{server.url}/studies", headers={"Authorization": f"Bearer {presented}"})
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"] == 'Bearer realm="dicom-gateway", error="invalid_token"'
    missing = httpx.get(f"{server.url}/studies")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == 'Bearer realm="dicom-gateway"'


def test_site_restricted_key_sees_only_its_site(server: DicomwebServer) -> None:
    study = server.index.search_studies(StudyQuery())[0].study_instance_uid
    _, elsewhere = _key(server, {"read"}, site="another-site")
    _, here = _key(server, {"read"}, site="site1")
    for key, count in ((elsewhere, 0), (here, 2)):
        auth = {"Authorization": f"Bearer {key}", **JSON}
        assert len(httpx.get(f"{server.url}/studies", headers=auth).json()) == count
    assert httpx.get(f"{server.url}/studies/{study}/metadata",
                     headers={"Authorization": f"Bearer {elsewhere}"}).status_code == 404


def test_a_valid_key_is_checked_on_the_event_loop_and_keeps_its_limits(server: DicomwebServer) -> None:
    _, here = _key(server, {"read"}, site="site1")
    _, elsewhere = _key(server, {"read"}, site="another-site")
    kept = server.app.state.inline_reads
    server.app.state.inline_reads = quick = InlineReads(server.index.engine, 10.0)
    try:
        counts = [len(httpx.get(f"{server.url}/studies", headers={"Authorization": f"Bearer {key}", **JSON})
                      .json()) for key in (here, elsewhere)]
        assert quick.answered == 4  # each key's lookup and each search, with no thread hop
    finally:
        server.app.state.inline_reads = kept
        quick.close()
    assert counts == [2, 0]


def test_oidc_tokens_are_verified_against_the_issuers_jwks(server: DicomwebServer,
                                                           issuer: _Issuer) -> None:
    good = issuer.token()
    answer = httpx.get(f"{server.url}/studies", headers={"Authorization": f"Bearer {good}", **JSON})
    assert answer.status_code == 200
    assert httpx.get(f"{server.root}/api/shares", headers={"Authorization": f"Bearer {good}"}).status_code == 200
    assert httpx.get(f"{server.root}/api/audit", headers={"Authorization": f"Bearer {good}"}).status_code == 403
    for bad in (issuer.token(key=OTHER_KEY), issuer.token(aud="someone-else"),
                issuer.token(exp=int(time.time()) - 3600), issuer.token(iss="https://evil.example")):
        refused = httpx.get(f"{server.url}/studies", headers={"Authorization": f"Bearer {bad}"})
        assert refused.status_code == 401, bad
    no_role = issuer.token(roles=["secretaire"])
    assert httpx.get(f"{server.url}/studies", headers={"Authorization": f"Bearer {no_role}"}).status_code == 403
    events = httpx.get(f"{server.root}/api/audit", params={"actor": "oidc:psc-8000000001"},
                       headers=ADMIN).json()["events"]
    assert events and all(e["user_id"] == "oidc:psc-8000000001" for e in events)


def test_share_notification_mail_has_the_link_but_never_the_pin(server: DicomwebServer,
                                                                mailbox: tuple[_Mailbox, int]) -> None:
    study = server.index.search_studies(StudyQuery())[0].study_instance_uid
    created = httpx.post(f"{server.root}/api/shares", headers=ADMIN, json={
        "study_uids": [study], "expires_in": 3600, "pin": "731904",
        "recipient_email": "dr.martin@chu-nord.example", "notify": True})
    assert created.status_code == 201 and created.json()["notified"] is True
    message = mailbox[0].messages[-1].decode()
    assert "dr.martin@chu-nord.example" in message
    assert created.json()["url"] in message.replace("=\r\n", "").replace("=\n", "")
    assert "731904" not in message


def test_audit_trail_is_queryable_exportable_and_append_only(server: DicomwebServer) -> None:
    study = server.index.search_studies(StudyQuery())[0].study_instance_uid
    httpx.get(f"{server.url}/studies/{study}/metadata", headers=ADMIN)
    page = httpx.get(f"{server.root}/api/audit", params={"action": "dicomweb.retrieve",
                                                         "study_uid": study}, headers=ADMIN)
    assert page.status_code == 200
    event = page.json()["events"][0]
    assert event["event_id"] == {"code": "110103", "scheme": "DCM", "meaning": "DICOM Instances Accessed"}
    assert event["event_action_code"] == "R" and event["event_outcome_indicator"] == 0
    assert event["user_id"] == "admin" and event["network_access_point_id"] == "127.0.0.1"
    assert httpx.get(f"{server.root}/api/audit?action=nonsense", headers=ADMIN).status_code == 400
    assert httpx.get(f"{server.root}/api/audit?since=2026-01-01T00:00:00", headers=ADMIN).status_code == 400
    exported = httpx.get(f"{server.root}/api/audit?format=jsonl", headers=ADMIN)
    lines = [json.loads(line) for line in exported.text.splitlines()]
    assert len(lines) >= 2 and [e["id"] for e in lines] == sorted(e["id"] for e in lines)
    with server.index.engine.begin() as connection, pytest.raises(DBAPIError, match="append-only"):
        connection.execute(text("UPDATE audit_events SET actor = 'x'"))
    with server.index.engine.begin() as connection, pytest.raises(DBAPIError, match="append-only"):
        connection.execute(text("DELETE FROM audit_events"))


def test_audit_trail_is_append_only_on_postgresql(postgres_url: str) -> None:
    engine = create_index_engine(postgres_url)
    migrate(engine)
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO audit_events (at, action, event_code, event_action, outcome, actor, address,"
            " user_agent, resource, study_instance_uid, share_id, detail) VALUES (now(), 'api.request',"
            " '110112', 'E', 0, 'admin', '', '', '/x', '', '', '')"))
    with engine.begin() as connection, pytest.raises(DBAPIError, match="append-only"):
        connection.execute(text("DELETE FROM audit_events"))


#: The trust-model tests run on both columns: the embedded index and PostgreSQL.
COLUMNS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.production)]


def _index_url(request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("create_postgres_database")() if request.param == "postgresql" else None


@pytest.fixture(params=COLUMNS)
def index_url(request: pytest.FixtureRequest) -> str | None:
    """None: SQLite under the server's folder; else a fresh PostgreSQL database."""
    return _index_url(request)


@pytest.fixture(scope="module", params=COLUMNS)
def regional_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                    issuer: _Issuer) -> Iterator[DicomwebServer]:
    """A regional index of several sites, on each column (for the site-limit tests)."""
    config = {"oidc": OidcConfig(issuer=issuer.url, audience="dicom-gateway", scope_claim="roles",
                                 scope_map={"radiologue": ("read", "share")})}
    with DicomwebServer(tmp_path_factory.mktemp("regional"), studies=2,
                        database_url=_index_url(request), **config) as running:
        yield running


@pytest.fixture
def strict_server(tmp_path: Path) -> Iterator[DicomwebServer]:
    """Low limits, and a server of its own: these tests block 127.0.0.1."""
    with DicomwebServer(tmp_path, auth_failure_limit=6, failure_window_seconds=600.0) as running:
        yield running


def _audit(server: DicomwebServer, **params: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{server.root}/api/audit", params=params, headers=ADMIN)
    assert answer.status_code == 200, answer.text
    events: list[dict[str, Any]] = answer.json()["events"]
    return events


def test_guessing_share_tokens_blocks_the_address_for_unknown_tokens_only(
        strict_server: DicomwebServer) -> None:
    server = strict_server
    study = server.index.search_studies(StudyQuery())[0].study_instance_uid
    created = httpx.post(f"{server.root}/api/shares", headers=ADMIN,
                         json={"study_uids": [study], "expires_in": 600}).json()
    statuses = [httpx.get(f"{server.root}/s/guess-{n:04d}-0123456789abcdefghij/dicom-web/studies").status_code
                for n in range(8)]
    assert statuses[:6] == [404] * 6 and statuses[6:] == [429] * 2
    blocked = httpx.get(f"{server.root}/s/guess-more-0123456789abcdefghij")
    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) > 0
    # a valid link from the blocked address is served all the same
    assert httpx.get(f"{server.root}/s/{created['token']}/dicom-web/studies", headers=JSON).status_code == 200
    assert httpx.get(f"{server.root}/s/{created['token']}").status_code == 200
    alerts = _audit(server, action="share.unknown_token")
    assert len(alerts) >= 9 and all("guess-" not in e["resource"] for e in alerts)
    assert {e["status_code"] for e in alerts} == {404, 429}


def test_a_blocked_address_is_still_served_with_valid_credentials(tmp_path: Path,
                                                                  index_url: str | None) -> None:
    """21 unknown tokens (the default limit is 20) from 127.0.0.1: further unknown tokens
    get 429, while the admin token, a valid API key and a valid share link from that
    same address are all served."""
    with DicomwebServer(tmp_path, database_url=index_url) as server:
        study = server.index.search_studies(StudyQuery())[0].study_instance_uid
        _, key = _key(server, {"read"})
        share = httpx.post(f"{server.root}/api/shares", headers=ADMIN,
                           json={"study_uids": [study], "expires_in": 600}).json()
        statuses = [httpx.get(f"{server.url}/studies", headers={"Authorization": f"Bearer {bad}"}).status_code
                    for bad in [f"guess-{n:04d}" for n in range(12)] + [f"dgw_{n:016x}_guess" for n in range(9)]]
        assert statuses[:20] == [401] * 20 and statuses[20] == 429
        for token in (TOKEN, key):
            assert httpx.get(f"{server.url}/studies", headers={"Authorization": f"Bearer {token}",
                                                                **JSON}).status_code == 200
        assert httpx.get(f"{server.root}/s/{share['token']}/dicom-web/studies", headers=JSON).status_code == 200
        refused = httpx.get(f"{server.url}/studies", headers={"Authorization": "Bearer guess-again"})
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
        assert refused.json()["error"]["code"] == "rate_limited"
        # no credential at all guesses nothing: a plain 401, not counted
        assert httpx.get(f"{server.url}/studies").status_code == 401
        failures = _audit(server, action="auth.invalid_token", limit="100")
        assert len(failures) == 22 and all(e["network_access_point_id"] == "127.0.0.1" for e in failures)


def test_wrong_secrets_of_a_key_count_against_that_key_not_the_address(
        strict_server: DicomwebServer) -> None:
    server = strict_server
    key_id, key = _key(server, {"read"})
    wrong = key[:-6] + "AAAAAA"
    statuses = [httpx.get(f"{server.url}/studies", headers={"Authorization": f"Bearer {wrong}"}).status_code
                for _ in range(8)]
    assert statuses[:6] == [401] * 6 and statuses[6:] == [429] * 2
    # the key itself still opens; the address is not blocked for other tokens
    assert httpx.get(f"{server.url}/studies", headers={"Authorization": f"Bearer {key}", **JSON}).status_code == 200
    assert httpx.get(f"{server.url}/studies", headers={"Authorization": "Bearer guess"}).status_code == 401
    _, other = _key(server, {"read"})
    assert httpx.get(f"{server.url}/studies", headers={
        "Authorization": f"Bearer {other[:-6]}AAAAAA"}).status_code == 401
    failures = _audit(server, action="auth.key_failure")
    assert {e["user_id"] for e in failures} == {f"key:{key_id}", f"key:{other.split('_')[1]}"}
    assert key not in json.dumps(failures) and wrong not in json.dumps(failures)


def test_wrong_pins_lock_their_share_and_no_other(strict_server: DicomwebServer) -> None:
    """Wrong PINs on shares A, B, C from one address (12, more than any per-address limit)
    lock none of them nor the address: share D opens with its PIN, and counts its own
    wrong PINs from zero; the 5th wrong PIN on A locks A alone."""
    server = strict_server
    study = server.index.search_studies(StudyQuery())[0].study_instance_uid
    tokens = [httpx.post(f"{server.root}/api/shares", headers=ADMIN, json={
        "study_uids": [study], "expires_in": 600, "pin": "5555"}).json()["token"] for _ in range(4)]
    first = [httpx.post(f"{server.root}/s/{token}/session", json={"pin": f"000{n}"}).status_code
             for token in tokens[:3] for n in range(4)]
    assert first == [401] * 12
    wrong = httpx.post(f"{server.root}/s/{tokens[3]}/session", json={"pin": "0001"})
    assert wrong.status_code == 401 and "4 attempts left" in wrong.json()["error"]["message"]
    assert httpx.post(f"{server.root}/s/{tokens[3]}/session", json={"pin": "5555"}).status_code == 201
    assert httpx.post(f"{server.root}/s/{tokens[0]}/session", json={"pin": "0009"}).status_code == 403
    assert httpx.post(f"{server.root}/s/{tokens[1]}/session", json={"pin": "5555"}).status_code == 201


def test_x_forwarded_for_is_ignored_unless_the_peer_is_a_listed_proxy(
        strict_server: DicomwebServer, tmp_path: Path) -> None:
    """No proxy listed: a client's X-Forwarded-For is ignored (the audit shows the peer, and
    spoofed addresses do not escape the count). 127.0.0.1 listed as a proxy: the right-most
    address not itself a listed proxy is the client's, audited and counted as such."""
    server = strict_server
    spoofed = [httpx.get(f"{server.url}/studies", headers={
        "Authorization": "Bearer guess", "X-Forwarded-For": f"198.51.100.{n}"}).status_code
        for n in range(8)]
    assert spoofed[6:] == [429, 429]
    events = _audit(server, action="auth.invalid_token")
    assert events and {e["network_access_point_id"] for e in events} == {"127.0.0.1"}
    from web_viewer_api import parse_networks

    with DicomwebServer(tmp_path / "proxied", auth_failure_limit=3,
                        trusted_proxies=parse_networks(["127.0.0.1", "10.0.0.0/8"])) as proxied:
        chain = "192.0.2.1, 203.0.113.7, 10.2.3.4"  # client-sent, the client, an inner proxy
        statuses = [httpx.get(f"{proxied.url}/studies", headers={
            "Authorization": "Bearer guess", "X-Forwarded-For": chain}).status_code for _ in range(4)]
        assert statuses == [401, 401, 401, 429]
        other = httpx.get(f"{proxied.url}/studies", headers={
            "Authorization": "Bearer guess", "X-Forwarded-For": "203.0.113.8"})
        assert other.status_code == 401  # another client behind the proxy: not blocked
        addresses = {e["network_access_point_id"] for e in _audit(proxied, action="auth.invalid_token")}
        assert addresses == {"203.0.113.7", "203.0.113.8"}


def test_audit_text_from_clients_is_bounded_and_single_line(server: DicomwebServer,
                                                             issuer: _Issuer,
                                                             postgres_url: str) -> None:
    """An OIDC subject with a newline is audited on one line; an over-long address is cut
    to its column (PostgreSQL would refuse it, and the batch with it)."""
    token = issuer.token(sub="psc-1\nadmin forged-line\r\x00")
    assert httpx.get(f"{server.url}/studies", headers={"Authorization": f"Bearer {token}",
                                                        **JSON}).status_code == 200
    [event] = _audit(server, actor="oidc:psc-1?admin forged-line??")
    assert event["user_id"] == "oidc:psc-1?admin forged-line??"
    from storage import AccessRepository, AuditEntry, AuditQuery

    engine = create_index_engine(postgres_url)
    migrate(engine)
    access = AccessRepository(engine)
    marker = f"bounded-{time.time_ns()}"
    access.append_audit([AuditEntry(at=dt.datetime.now(dt.UTC), action="api.request",
                                    event_code="110112", event_action="E", outcome=0,
                                    actor=marker + "\n" + "x" * 400, address="2001:db8::" + "f" * 200,
                                    user_agent="agent\r\nX-Forged: 1")])
    [stored] = [e for e in access.search_audit(AuditQuery(limit=50)) if e.actor.startswith(marker)]
    assert len(stored.actor) == 300 and "\n" not in stored.actor
    assert len(stored.address) == 64 and stored.user_agent == "agent??X-Forged: 1"


def _site_with_a_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                       ) -> tuple[CliRunner, Any, str]:
    """A site's data folder with the sample study imported: the CLI runner, the index's
    engine and the study's (de-identified) UID."""
    from gateway.cli import app
    from storage import IndexRepository

    monkeypatch.setenv("DICOM_GATEWAY_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DICOM_GATEWAY_PSEUDONYM_SECRET", "cli-test-secret-0123456789abcdef")
    runner = CliRunner()
    assert runner.invoke(app, ["sample-data", str(tmp_path / "sample")]).exit_code == 0
    assert runner.invoke(app, ["import", str(tmp_path / "sample")]).exit_code == 0
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    return runner, engine, IndexRepository(engine).search_studies(StudyQuery())[0].study_instance_uid


def test_cli_creates_lists_and_revokes_shares_and_keys(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.cli import app
    from storage import AccessRepository

    monkeypatch.setenv("DICOM_GATEWAY_ADMIN_TOKEN", "cli-test-admin-0123456789abcdef")
    runner, engine, study = _site_with_a_study(tmp_path, monkeypatch)
    created = runner.invoke(app, ["share", "create", study, "--expires", "2d", "--pin",
                                  "--max-uses", "3", "--download"])
    assert created.exit_code == 0, created.output
    url = created.stdout.strip().splitlines()[-1]
    assert "/s/" in url and "PIN" in created.output
    listed = [json.loads(line) for line in runner.invoke(app, ["share", "list"]).stdout.splitlines()]
    assert len(listed) == 1 and listed[0]["has_pin"] and listed[0]["max_uses"] == 3
    assert listed[0]["permissions"] == ["download"] and listed[0]["allow_download"]
    lifetime = dt.datetime.fromisoformat(listed[0]["expires_at"]) - dt.datetime.fromisoformat(listed[0]["created_at"])
    assert lifetime == dt.timedelta(days=2)
    assert runner.invoke(app, ["share", "create", study, "--expires", "90d"]).exit_code != 0
    assert runner.invoke(app, ["share", "create", "1.2.3.4"]).exit_code != 0
    # The schema the API reads checks the CLI's options too: an unknown permission is named.
    unknown = runner.invoke(app, ["share", "create", study, "--permission", "delete"])
    assert unknown.exit_code != 0 and "permissions" in unknown.output and "download" in unknown.output
    assert runner.invoke(app, ["apikey", "create", "--name", "x", "--scope", "root"]).exit_code != 0
    assert runner.invoke(app, ["share", "revoke", listed[0]["id"]]).exit_code == 0
    assert json.loads(runner.invoke(app, ["share", "list"]).stdout)["status"] == "revoked"
    key = runner.invoke(app, ["apikey", "create", "--name", "PACS", "--scope", "read", "--site", "site1"])
    assert key.exit_code == 0 and key.stdout.strip().startswith("dgw_")
    keys = [json.loads(line) for line in runner.invoke(app, ["apikey", "list"]).stdout.splitlines()]
    assert keys[0]["scopes"] == ["read"] and keys[0]["sites"] == ["site1"]
    assert key.stdout.strip() not in runner.invoke(app, ["apikey", "list"]).stdout
    assert runner.invoke(app, ["apikey", "revoke", keys[0]["id"]]).exit_code == 0
    assert runner.invoke(app, ["apikey", "revoke", keys[0]["id"]]).exit_code != 0
    actions = [e.action for e in AccessRepository(engine).search_audit(
        __import__("storage").AuditQuery(newest_first=False))]
    assert actions == ["share.create", "share.revoke", "apikey.create", "apikey.revoke"]


def test_a_key_of_site_b_cannot_read_site_a_at_any_dicomweb_level(regional_server: DicomwebServer,
                                                                  tmp_path: Path) -> None:
    """Two sites' studies in one regional index: a key restricted to site B sees B's study
    and nothing of A's — search at every level, metadata, frames, retrieve all say 404/empty."""
    server = regional_server
    from gateway.sample_study import PlantedIdentity, SampleStudySpec, write_sample_study
    from spool import Spool
    from storage import InstanceQuery

    folder = tmp_path / "site-b-study"
    write_sample_study(folder, SampleStudySpec(ct_slices=2, mr_slices=0, ct_size=32, seed=909,
                                               identity=PlantedIdentity(patient_id="B-1")))
    spool = Spool(server.pipeline.spool_root, "site-b")
    for path in folder.rglob("*.dcm"):
        spool.write("site-b-batch", str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID),
                    path.read_bytes())
    assert server.pipeline.ingest_batch("site-b", "site-b-batch").stored == 2
    with server.index.engine.connect() as connection:
        sites = dict(connection.execute(text("SELECT study_instance_uid, site_id FROM studies")).all())
    site_b = [uid for uid, site in sites.items() if site == "site-b"]
    site_a = [uid for uid, site in sites.items() if site != "site-b"]
    assert len(site_b) == 1 and site_a
    _, key = _key(server, {"read"}, site="site-b")
    auth = {"Authorization": f"Bearer {key}", **JSON}
    assert [s["0020000D"]["Value"][0] for s in httpx.get(f"{server.url}/studies", headers=auth).json()] == site_b
    assert {i["0020000D"]["Value"][0] for i in httpx.get(f"{server.url}/instances", headers=auth).json()} == set(site_b)
    assert {s["0020000D"]["Value"][0] for s in httpx.get(f"{server.url}/series", headers=auth).json()} == set(site_b)
    for study in site_a:
        instance = server.index.search_instances(InstanceQuery(study_instance_uid=study, limit=1))[0]
        base = f"{server.url}/studies/{study}"
        for path in ("/metadata", f"/series/{instance.series_instance_uid}/metadata",
                     f"/series/{instance.series_instance_uid}/instances/{instance.sop_instance_uid}/frames/1"):
            assert httpx.get(base + path, headers={"Authorization": f"Bearer {key}"}).status_code == 404, path
        assert httpx.get(base, headers={"Authorization": f"Bearer {key}",
                                         "Accept": 'multipart/related; type="application/dicom"'}).status_code == 404
        assert httpx.get(f"{base}/series", headers=auth).json() == []


def _ingest_site_study(server: DicomwebServer, tmp_path: Path, site: str, seed: int) -> str:
    """One more study, produced by `site`, through the pipeline; its de-identified UID."""
    from gateway.sample_study import PlantedIdentity, SampleStudySpec, write_sample_study
    from spool import Spool

    folder = tmp_path / f"{site}-study"
    write_sample_study(folder, SampleStudySpec(ct_slices=1, mr_slices=0, ct_size=32, seed=seed,
                                               identity=PlantedIdentity(patient_id=f"{site}-1")))
    spool = Spool(server.pipeline.spool_root, site)
    for path in folder.rglob("*.dcm"):
        spool.write(f"{site}-batch", str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID),
                    path.read_bytes())
    report = server.pipeline.ingest_batch(site, f"{site}-batch")
    assert report.stored == 1
    [study] = report.stored_study_uids
    return study


def _sites(server: DicomwebServer) -> dict[str, str]:
    with server.index.engine.connect() as connection:
        return dict(connection.execute(text("SELECT study_instance_uid, site_id FROM studies")).all())


def test_a_key_limited_to_two_sites_sees_both_and_no_other(regional_server: DicomwebServer,
                                                           tmp_path: Path) -> None:
    server = regional_server
    east = _ingest_site_study(server, tmp_path, "site-east", 4101)
    west = _ingest_site_study(server, tmp_path, "site-west", 4102)
    sites = _sites(server)
    _, key = _key(server, {"read"}, sites={"site-east", "site-west"})
    auth = {"Authorization": f"Bearer {key}", **JSON}
    seen = {s["0020000D"]["Value"][0] for s in httpx.get(f"{server.url}/studies", headers=auth).json()}
    assert seen == {east, west}
    other = next(uid for uid, site in sites.items() if site not in ("site-east", "site-west"))
    assert httpx.get(f"{server.url}/studies/{other}/metadata", headers=auth).status_code == 404


def test_a_shares_only_key_shares_its_sites_studies_and_reads_no_images(
        regional_server: DicomwebServer, tmp_path: Path) -> None:
    """`--scope share` limited to one site: it creates, lists and revokes shares of that
    site's studies only, and can read nothing through /dicom-web; its share opens."""
    server = regional_server
    north = _ingest_site_study(server, tmp_path, "site-north", 4201)
    elsewhere = next(uid for uid, site in _sites(server).items() if site != "site-north")
    _, key = _key(server, {"share"}, sites={"site-north"})
    auth = {"Authorization": f"Bearer {key}"}
    for path in ("/studies", f"/studies/{north}/metadata", f"/studies/{north}/series"):
        assert httpx.get(f"{server.url}{path}", headers={**auth, **JSON}).status_code == 403, path
    assert httpx.get(f"{server.root}/api/audit", headers=auth).status_code == 403
    refused = httpx.post(f"{server.root}/api/shares", headers=auth,
                         json={"study_uids": [elsewhere], "expires_in": 3600})
    assert refused.status_code == 404 and refused.json()["error"]
    created = httpx.post(f"{server.root}/api/shares", headers=auth,
                         json={"study_uids": [north], "expires_in": 3600})
    assert created.status_code == 201
    mine = created.json()
    theirs = httpx.post(f"{server.root}/api/shares", headers=ADMIN,
                        json={"study_uids": [elsewhere], "expires_in": 3600}).json()
    listed = {s["id"] for s in httpx.get(f"{server.root}/api/shares", headers=auth).json()}
    assert mine["id"] in listed and theirs["id"] not in listed
    assert httpx.get(f"{server.root}/api/shares/{theirs['id']}", headers=auth).status_code == 404
    assert httpx.delete(f"{server.root}/api/shares/{theirs['id']}", headers=auth).status_code == 404
    assert httpx.get(f"{server.root}/api/shares/{theirs['id']}", headers=ADMIN).json()["status"] == "active"
    token = mine["url"].rsplit("/s/", 1)[1]
    with httpx.Client() as viewer:
        assert viewer.post(f"{server.root}/s/{token}/session", json={}).status_code == 201
        studies = viewer.get(f"{server.root}/s/{token}/dicom-web/studies", headers=JSON).json()
    assert [s["0020000D"]["Value"][0] for s in studies] == [north]
    assert httpx.delete(f"{server.root}/api/shares/{mine['id']}", headers=auth).status_code == 200


def test_oidc_site_claim_limits_to_the_named_sites(tmp_path_factory: pytest.TempPathFactory,
                                                   issuer: _Issuer, tmp_path: Path,
                                                   index_url: str | None) -> None:
    """A `sites` claim (list or space-separated) limits an OIDC user to those sites; a role
    mapped to `share` alone makes a shares-only identity; no claim at all: 401."""
    config = {"oidc": OidcConfig(issuer=issuer.url, audience="dicom-gateway", scope_claim="roles",
                                 scope_map={"radiologue": ("read", "share"), "secretariat": ("share",)},
                                 site_claim="sites")}
    with DicomwebServer(tmp_path_factory.mktemp("oidc-sites"), database_url=index_url,
                        **config) as server:
        south = _ingest_site_study(server, tmp_path, "site-south", 4301)
        listed = lambda token: {s["0020000D"]["Value"][0] for s in httpx.get(  # noqa: E731
            f"{server.url}/studies", headers={"Authorization": f"Bearer {token}", **JSON}).json()}
        assert listed(issuer.token(sites=["site-south"])) == {south}
        assert listed(issuer.token(sites="site1 site-south")) == set(_sites(server))
        for no_site in ({}, {"sites": [""]}, {"sites": [None]}, {"sites": "  "}, {"sites": ["../x"]}):
            assert httpx.get(f"{server.url}/studies", headers={  # no (valid) site named
                "Authorization": f"Bearer {issuer.token(**no_site)}"}).status_code == 401, no_site
        clerk = {"Authorization": f"Bearer {issuer.token(roles=['secretariat'], sites=['site-south'])}"}
        assert httpx.get(f"{server.url}/studies", headers={**clerk, **JSON}).status_code == 403
        assert httpx.post(f"{server.root}/api/shares", headers=clerk,
                          json={"study_uids": [south], "expires_in": 600}).status_code == 201


def _audit_pages(server: DicomwebServer, auth: dict[str, str], until: str,
                 page_size: int) -> list[dict[str, Any]]:
    """Every event up to `until`, page by page through limit/offset/next_offset."""
    events: list[dict[str, Any]] = []
    offset: int | None = 0
    while offset is not None:
        page = httpx.get(f"{server.root}/api/audit", headers=auth,
                         params={"until": until, "limit": page_size, "offset": offset})
        assert page.status_code == 200, page.text
        events += page.json()["events"]
        offset = page.json().get("next_offset")
    return events


def _site_events(server: DicomwebServer, tmp_path: Path) -> dict[str, str]:
    """Events about a study of site A (the server's own, site1) and of site B — reads,
    shares, a DIMSE-like row — plus events about neither."""
    from storage import AuditEntry

    a_study = next(uid for uid, site in _sites(server).items() if site == "site1")
    b_study = _ingest_site_study(server, tmp_path, "site-b", 5101)
    for study in (a_study, b_study):
        assert httpx.get(f"{server.url}/studies/{study}/metadata", headers=ADMIN).status_code == 200
    shares = {name: httpx.post(f"{server.root}/api/shares", headers=ADMIN,
                               json={"study_uids": [study], "expires_in": 3600}).json()["id"]
              for name, study in (("a", a_study), ("b", b_study))}
    mixed = httpx.post(f"{server.root}/api/shares", headers=ADMIN,
                       json={"study_uids": [b_study, a_study], "expires_in": 3600}).json()["id"]
    for share in (*shares.values(), mixed):
        assert httpx.get(f"{server.root}/api/shares/{share}", headers=ADMIN).status_code == 200
    assert httpx.get(f"{server.url}/studies", headers={"Authorization": "Bearer nope"}).status_code == 401
    now = dt.datetime.now(dt.UTC)
    server.access.append_audit([  # as the DIMSE side writes them: actor "ae:<TITLE>"
        AuditEntry(at=now, action="dicomweb.retrieve", event_code="110103", event_action="R",
                   outcome=0, actor=f"ae:MODALITY_{name}", study_instance_uid=study)
        for name, study in (("A", a_study), ("B", b_study), ("X", "1.2.826.0.1.999"))])
    return {"a_study": a_study, "b_study": b_study, "a_share": shares["a"],
            "b_share": shares["b"], "mixed_share": mixed}


def test_an_admin_limited_to_site_b_reads_only_site_b_events(tmp_path: Path) -> None:
    """/api/audit for an admin key limited to site B: events about B's studies and B's
    shares, and its own; never A's, a share mixing A and B, nor events about no study or
    share (an unknown address's failed token, another caller's request). Paging and the
    JSON Lines export give the same set; an unrestricted admin sees everything."""
    with DicomwebServer(tmp_path / "server") as server:
        ids = _site_events(server, tmp_path)
        key_id, key = _key(server, {"admin"}, site="site-b")
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{server.url}/studies", headers={**auth, **JSON}).status_code == 403
        server.app.state.audit_writer.flush()
        until = (dt.datetime.now(dt.UTC) + dt.timedelta(milliseconds=1)).isoformat()
        seen = _audit_pages(server, auth, until, 1000)
        assert seen, "site B has events"
        for event in seen:
            about_b = (event["study_instance_uid"] in (None, ids["b_study"])
                       and event["share_id"] in (None, ids["b_share"])
                       and (event["study_instance_uid"] or event["share_id"]))
            assert about_b or event["user_id"] == f"key:{key_id}", event
        actions = {(e["action"], e["user_id"], e["study_instance_uid"], e["share_id"]) for e in seen}
        assert ("dicomweb.retrieve", "ae:MODALITY_B", ids["b_study"], None) in actions
        assert ("share.create", "admin", ids["b_study"], ids["b_share"]) in actions
        assert any(e["action"] == "dicomweb.retrieve" and e["user_id"] == "admin"
                   and e["study_instance_uid"] == ids["b_study"] for e in seen)
        assert any(e["action"] == "auth.forbidden" or e["user_id"] == f"key:{key_id}" for e in seen)
        paged = _audit_pages(server, auth, until, 2)
        assert [e["id"] for e in paged] == [e["id"] for e in seen]
        exported = httpx.get(f"{server.root}/api/audit", headers=auth,
                             params={"until": until, "format": "jsonl"})
        assert sorted(json.loads(line)["id"] for line in exported.text.splitlines()) == sorted(
            e["id"] for e in seen)
        for name, value in (("study_uid", ids["a_study"]), ("share_id", ids["a_share"]),
                            ("share_id", ids["mixed_share"]), ("actor", "admin")):
            filtered = httpx.get(f"{server.root}/api/audit", headers=auth, params={name: value})
            assert all(e["study_instance_uid"] != ids["a_study"] and e["share_id"] in (None, ids["b_share"])
                       for e in filtered.json()["events"]), (name, filtered.json())
        everything = _audit_pages(server, ADMIN, until, 1000)
        assert {e["id"] for e in seen} < {e["id"] for e in everything}
        for wanted in (ids["a_study"], ids["a_share"], ids["mixed_share"], "ae:MODALITY_X"):
            assert any(wanted in (e["study_instance_uid"], e["share_id"], e["user_id"])
                       for e in everything), wanted
        assert any(e["action"] in ("auth.failure", "auth.invalid_token") for e in everything)


def test_audit_site_limits_on_postgresql(postgres_url: str) -> None:
    """The same rule in PostgreSQL's SQL: a caller limited to site B reads events about B's
    studies and shares and its own, with consistent limit/offset pages."""
    from storage import (
        AccessRepository,
        AuditEntry,
        AuditQuery,
        IndexRepository,
        ShareItemRecord,
        ShareRecord,
    )
    from tests.support.index_records import study_records

    engine = create_index_engine(postgres_url)
    migrate(engine)
    index, access = IndexRepository(engine), AccessRepository(engine)
    suffix = str(time.time_ns())
    studies = {"site-a": f"1.2.826.0.1.7.{suffix}.1", "site-b": f"1.2.826.0.1.7.{suffix}.2"}
    for site, study in studies.items():
        records = study_records(study, f"P{site}")
        for record in records:
            record.study["site_id"] = site
        index.upsert_instances(records)
    now = dt.datetime.now(dt.UTC)
    for site, study in studies.items():
        access.add_share(ShareRecord(
            share_id=f"{site}-{suffix}", created_at=now, created_by="admin",
            expires_at=now + dt.timedelta(hours=1), revoked_at=None, pin_hash=None,
            pin_failures=0, locked_at=None, max_uses=None, uses=0, permissions=frozenset(),
            recipient="", recipient_email="", note="", site_ids=None,
            items=(ShareItemRecord(study),)), f"{site}-{suffix}".ljust(64, "0"))
    caller = f"key:b-{suffix}"

    def event(actor: str, study: str = "", share: str = "") -> AuditEntry:
        return AuditEntry(at=now, action="dicomweb.retrieve", event_code="110103",
                          event_action="R", outcome=0, actor=actor, resource=suffix,
                          study_instance_uid=study, share_id=share)

    access.append_audit([
        event("admin", studies["site-a"]), event("admin", studies["site-b"]),
        event("admin", share=f"site-a-{suffix}"), event("admin", share=f"site-b-{suffix}"),
        event("ae:B", studies["site-b"], f"site-a-{suffix}"), event("admin"), event(caller),
        event("ae:X", "1.2.826.0.1.7.404")])
    window = {"since": now - dt.timedelta(seconds=1), "until": now + dt.timedelta(seconds=1)}
    limited = access.search_audit(AuditQuery(**window, site_ids=frozenset({"site-b"}),
                                             caller=caller, limit=1000))
    mine = [(e.actor, e.study_instance_uid, e.share_id) for e in limited if e.resource == suffix]
    assert sorted(mine) == sorted([("admin", studies["site-b"], ""), ("admin", "", f"site-b-{suffix}"),
                                   (caller, "", "")])
    paged = [e for offset in range(10) for e in access.search_audit(AuditQuery(
        **window, site_ids=frozenset({"site-b"}), caller=caller, limit=1, offset=offset))]
    assert [e.event_id for e in paged] == [e.event_id for e in limited]
    everyone = [e for e in access.search_audit(AuditQuery(**window, limit=1000)) if e.resource == suffix]
    assert len(everyone) == 8
    assert access.search_audit(AuditQuery(**window, site_ids=frozenset(), caller=None)) == []


def test_a_write_key_of_another_site_cannot_store_as_this_api_s_site(server: DicomwebServer,
                                                                       tmp_path: Path) -> None:
    """STOW-RS files uploads under the API's site (its spool, queue and ownership): a key
    limited to another site is refused before anything is read or spooled; a key of this
    site, or unrestricted, stores."""
    [path] = write_sample_study(tmp_path / "stow", SampleStudySpec(ct_slices=1, mr_slices=0,
                                                                   ct_size=32, seed=77))
    boundary = "site-rule"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes()
            + f"\r\n--{boundary}--\r\n".encode())
    headers = {"Accept": "application/dicom+json",
               "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    spooled = len(server.enqueued)
    _, other_site = _key(server, {"write"}, site="site-b")
    refused = httpx.post(f"{server.url}/studies", content=body,
                         headers={**headers, "Authorization": f"Bearer {other_site}"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    assert "site1" in refused.json()["error"]["message"]
    assert len(server.enqueued) == spooled
    for sites in ({"site1"}, {"site-b", "site1"}):
        _, allowed = _key(server, {"write"}, sites=sites)
        stored = httpx.post(f"{server.url}/studies", content=body,
                            headers={**headers, "Authorization": f"Bearer {allowed}"})
        assert stored.status_code == 202, stored.text  # stored de-identified (B000)
    assert len(server.enqueued) == spooled + 2


def test_cli_seals_a_context_at_the_site_and_prints_its_key_only_in_the_link(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from access.sealed_context import unseal
    from gateway.cli import app
    from storage import AccessRepository

    runner, engine, study = _site_with_a_study(tmp_path, monkeypatch)
    context = {"patient_name": "DUPONT^Marie", "clinical_question": "Embolie ?"}
    (tmp_path / "context.json").write_text(json.dumps(context), encoding="utf-8")
    created = runner.invoke(app, ["share", "create", study, "--context", str(tmp_path / "context.json")])
    assert created.exit_code == 0, created.output
    url, _, key = created.stdout.strip().splitlines()[-1].partition("#k=")
    assert "/s/" in url and len(key) == 43
    [share] = AccessRepository(engine).list_shares()
    assert unseal(share.sealed_context, key) == context  # ciphertext only, the key opens it
    stored = json.dumps([str(v) for v in share.__dict__.values()])
    assert "DUPONT" not in stored and key not in stored
    assert not any(key in e.detail or "DUPONT" in e.detail
                   for e in AccessRepository(engine).search_audit(__import__("storage").AuditQuery()))
    (tmp_path / "bad.json").write_text('["not", "an object"]', encoding="utf-8")
    refused = runner.invoke(app, ["share", "create", study, "--context", str(tmp_path / "bad.json")])
    assert refused.exit_code != 0 and "--context" in refused.output


def test_cli_share_links_point_at_the_api_of_the_data_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The API started with `--http-port` records where it answers; `share create` on the
    same data folder prints links there (not the default port), and they open."""
    from gateway.cli import app
    from tests.support.services import (
        GatewayProcess,
        free_port,
        gateway_command,
        gateway_env,
        wait_for,
    )

    runner, _engine, study = _site_with_a_study(tmp_path, monkeypatch)
    port = free_port()
    env = gateway_env(tmp_path, PSEUDONYM_SECRET="cli-test-secret-0123456789abcdef",
                      ADMIN_TOKEN="cli-test-admin-0123456789abcdef")
    with GatewayProcess(gateway_command("api", "--http-port", str(port)), env, tmp_path / "api.log"):
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/livez", timeout=2).status_code == 200,
                 timeout=60, what="the API to answer")
        created = runner.invoke(app, ["share", "create", study])
        assert created.exit_code == 0, created.output
        url = created.stdout.strip().splitlines()[-1]
        assert url.startswith(f"http://127.0.0.1:{port}/s/"), url
        assert httpx.get(url, timeout=10).status_code == 200
