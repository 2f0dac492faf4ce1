"""`create_app(config, index, store)`: the FastAPI application, built from explicit values."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import gc
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Literal

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Histogram, make_asgi_app
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from access.shares import SharePolicy, ShareService
from imaging import DEFAULT_DECODE_LIMITS, DecodeLimits
from spool import Spool, batch_states
from storage import AccessRepository, AuditWriter, IndexRepository, ObjectStore
from web_viewer_api.asgi import StatusRecorder
from web_viewer_api.audit import (
    INVALID_TOKENS,
    KEY_FAILURES,
    SHARE_FAILURES,
    AuditMiddleware,
)
from web_viewer_api.auth import Authenticator, FailureLimiter, ShareGate
from web_viewer_api.dicomweb.rendering import RenderedCache, RenderLimits
from web_viewer_api.dicomweb.stow import StowTarget
from web_viewer_api.errors import install_error_handlers
from web_viewer_api.lookup import PseudonymLookup
from web_viewer_api.loop_reads import InlineReads
from web_viewer_api.notify import SmtpConfig
from web_viewer_api.oidc import OidcConfig, OidcVerifier
from web_viewer_api.proxies import TrustedProxies
from web_viewer_api.request_limits import RequestLimits, RequestLimitsMiddleware
from web_viewer_api.routes import audit, dicomweb, health, share_access, shares, site

log = logging.getLogger(__name__)

Probe = Callable[[], None]


@dataclass(frozen=True)
class ApiConfig:
    """What the API needs from the settings."""

    admin_token: str
    readiness_probes: Mapping[str, Probe] = field(default_factory=dict)
    #: The site's quarantine folder, when this API runs beside the worker (serve).
    quarantine_dir: Path | None = None
    #: The address clients reach us at (RetrieveURL, BulkDataURI); else the request's Host.
    public_url: str | None = None
    #: Where STOW-RS puts instances (the site's spool); None: STOW-RS answers 503.
    stow: StowTarget | None = None
    #: Origins allowed to call the API from a browser (viewers hosted elsewhere).
    cors_origins: tuple[str, ...] = ()
    #: Share link limits (maximum expiry, session lifetime, PIN lock).
    shares: SharePolicy = field(default_factory=SharePolicy)
    #: OIDC bearer tokens accepted beside API keys (None: none).
    oidc: OidcConfig | None = None
    #: SMTP relay for share notifications (None: no e-mail).
    smtp: SmtpConfig | None = None
    #: (accession, patient ID, accession issuer, patient ID issuer, site) -> their pseudonyms;
    #: None when this API does not hold the pseudonymization secret.
    lookup: PseudonymLookup | None = None
    #: "site": at a producing site (identified uploads, lookups by original identifiers);
    #: "region": the regional API, without the secret (STOW-RS takes objects of the domain
    #: only, lookups answer that they are computed at the site).
    role: Literal["site", "region"] = "site"
    #: The site looked up when the caller names none.
    default_site: str = ""
    #: Failures before 429, and the window: tokens that open nothing and unknown share
    #: tokens per client address, wrong secrets per API key id. (Wrong PINs lock their
    #: share: `shares.pin_lock_after`.)
    auth_failure_limit: int = 20
    failure_window_seconds: float = 900.0
    #: Proxies (addresses, networks) whose X-Forwarded-For names the client; none: the
    #: peer is the client.
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    #: A running share download checks, at most this often, that its share is still live.
    share_liveness_seconds: float = 1.0
    #: With several API processes on one port: the folder where each process writes its
    #: metrics (prometheus_client's multiprocess mode), so that /metrics, whichever process
    #: answers, sums them all. None: one process, its own counters.
    metrics_multiprocess_dir: Path | None = None
    #: Time an index search may take on the event loop (SQLite only; see
    #: web_viewer_api.loop_reads): beyond it, the search runs in a worker thread. 0: always there.
    inline_read_budget_seconds: float = 0.005
    #: Largest decoded pixel data an instance may declare to be decoded for a client.
    decode_limits: DecodeLimits = DEFAULT_DECODE_LIMITS
    #: Longest URL (414 beyond) and headers (431 beyond) served, on every route.
    request_limits: RequestLimits = field(default_factory=RequestLimits)
    #: The largest frame a rendered or thumbnail request decodes (422 above), and the byte
    #: budget of the cache of rendered images.
    rendering: RenderLimits = field(default_factory=RenderLimits)


class _QuarantineCollector(Collector):
    """Instances in quarantine, by reason, read from the reason files at scrape time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "dicom_gateway_quarantined_instances",
            "Instances the worker refused, by reason",
            labels=["reason"],
        )
        counts: Counter[str] = Counter()
        for path in self.folder.glob("*/*/*.reason.json"):
            try:
                counts[str(json.loads(path.read_text()).get("reason", "unknown"))] += 1
            except (OSError, ValueError):
                counts["unreadable"] += 1
        for reason, count in sorted(counts.items()):
            gauge.add_metric([reason], count)
        yield gauge


class _RecoveryCollector(Collector):
    """What is still to be done after a crash or an outage, read at scrape time: studies
    whose completion is pending (and of those, failed at least once: retried with a growing
    wait), and this API's site spool's batches by the state of their hand-over
    (`spool.recovery`: `unsent` is one the workers' recovery loop sends at its next pass)."""

    def __init__(self, index: IndexRepository, spool: Spool | None) -> None:
        self.index, self.spool = index, spool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        completions = GaugeMetricFamily(
            "dicom_gateway_study_completions",
            "Studies whose completion (metadata, thumbnails, KOS, webhook) is pending",
            labels=["state"],
        )
        try:
            pending, failed = self.index.completion_counts()
        except SQLAlchemyError:
            pending = failed = -1  # the index does not answer: readiness says so too
        completions.add_metric(["pending"], pending)
        completions.add_metric(["failed"], failed)
        yield completions
        if self.spool is None:
            return
        batches = GaugeMetricFamily(
            "dicom_gateway_spool_batches",
            "Spool batches holding instances, by the state of their hand-over to a worker",
            labels=["state"],
        )
        for state, count in sorted(batch_states(self.spool).items()):
            batches.add_metric([state], count)
        yield batches


class _MetricsMiddleware:
    """Counts requests by route and status, and their latency (pure ASGI: no extra task per
    request, unlike `@app.middleware("http")`)."""

    def __init__(self, app: ASGIApp, requests: PromCounter, latency: Histogram) -> None:
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = StatusRecorder(send)
        try:
            await status.run(self.app, scope, receive)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(scope.get("method", ""), path, str(status.code)).inc()
            self.latency.labels(path).observe(time.perf_counter() - started)


class _ShareResponsesNotStored:
    """Every answer under /s/{token} (viewer page, DICOMweb, download, errors) is
    `Cache-Control: private, no-store`: nothing of a share outlives its session in a
    browser's or a proxy's cache, and a revoked share's images are not shown from one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/s/"):
            await self.app(scope, receive, send)
            return

        async def not_stored(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.lower() != b"cache-control"
                ]
                message = {
                    **message,
                    "headers": [*headers, (b"cache-control", b"private, no-store")],
                }
            await send(message)

        await self.app(scope, receive, not_stored)


def create_app(config: ApiConfig, index: IndexRepository, store: ObjectStore) -> FastAPI:
    """Build the API; nothing connects until a request arrives."""
    if not config.admin_token:
        raise ValueError("an admin token is required")
    if config.role == "region" and config.lookup is not None:
        raise ValueError("a regional API computes no pseudonyms: it must not be given a lookup")
    access = AccessRepository(index.engine)
    writer = AuditWriter(access)
    inline_reads = InlineReads(index.engine, config.inline_read_budget_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if config.stow is not None:
            config.stow.clean_orphans()  # uploads cut short by a crash of an earlier process
        # What start-up built (DICOM dictionaries, routes, SQLAlchemy metadata) lives as long
        # as the process: out of the collector's sight, a full collection no longer walks
        # it — one took 126 ms in the middle of a series metadata request.
        gc.collect()
        gc.freeze()
        try:  # the event loop's own index connection, opened before any request waits on it
            inline_reads.warm()
        except SQLAlchemyError as exc:  # the first search opens it (or goes to a thread)
            log.warning("index not readable at start-up: %s", type(exc).__name__)
        yield
        writer.close()  # the queued audit events reach the database before we exit
        inline_reads.close()

    app = FastAPI(
        lifespan=lifespan,
        title="dicom-gateway",
        version="0.1.0",
        description="DICOMweb, share links and audit for de-identified studies.",
    )
    probes = {"index": index.check, "object_store": store.check, **config.readiness_probes}
    app.state.config = dataclasses.replace(config, readiness_probes=probes)
    app.state.access = access
    app.state.audit_writer = writer

    def recorded(actions: tuple[str, ...], by: str) -> Callable[[str, dt.datetime], int]:
        """Failures of one key written by every API process: by address, or by actor."""

        def count(key: str, since: dt.datetime) -> int:
            writer.flush()  # raises if the database is down: the request fails closed
            if by == "actor":
                return access.count_recent_audit(actions=actions, since=since, actor=f"key:{key}")
            return access.count_recent_audit(actions=actions, since=since, address=key)

        return count

    window, limit = config.failure_window_seconds, config.auth_failure_limit
    app.state.authenticator = Authenticator(
        config.admin_token,
        access,
        OidcVerifier(config.oidc) if config.oidc else None,
        FailureLimiter(limit, window, recorded(INVALID_TOKENS, "address")),
        FailureLimiter(limit, window, recorded(KEY_FAILURES, "actor"), subject="with this API key"),
    )
    app.state.share_gate = ShareGate(
        access,
        FailureLimiter(limit, window, recorded(SHARE_FAILURES, "address")),
        session_lifetime=config.shares.session_lifetime,
    )
    app.state.share_service = ShareService(access, index, config.shares)
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_credentials=False,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Accept", "Content-Type", "If-None-Match"],
            expose_headers=["Warning", "ETag", "Content-Type", "Content-Encoding"],
            max_age=600,
        )
    app.state.index = index
    app.state.inline_reads = inline_reads
    app.state.store = store
    install_error_handlers(app)
    dicomweb.install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(dicomweb.router)
    app.include_router(shares.router)
    app.include_router(site.router)
    app.include_router(audit.router)
    app.include_router(share_access.router)
    app.include_router(dicomweb.share_router())
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")

    registry = CollectorRegistry()
    scraped = registry
    if config.metrics_multiprocess_dir is not None:
        # The counters below write to per-process files (the environment chose the value
        # class when prometheus_client was imported); a scrape sums every process's files.
        scraped = CollectorRegistry()
        folder = str(config.metrics_multiprocess_dir)
        MultiProcessCollector(scraped, path=folder)  # type: ignore[no-untyped-call]
    if config.quarantine_dir is not None:
        scraped.register(_QuarantineCollector(config.quarantine_dir))
    scraped.register(
        _RecoveryCollector(index, config.stow.spool if config.stow is not None else None)
    )
    requests = PromCounter(
        "dicom_gateway_http_requests_total",
        "HTTP requests",
        ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram(
        "dicom_gateway_http_request_seconds", "HTTP request latency", ["route"], registry=registry
    )
    render_lookups = PromCounter(
        "dicom_gateway_rendered_cache_lookups_total",
        "Rendered and thumbnail requests by cache outcome (hit: served without decoding)",
        ["outcome"],
        registry=registry,
    )
    app.state.rendered_cache = (
        RenderedCache(
            config.rendering.cache_bytes, lambda outcome: render_lookups.labels(outcome).inc()
        )
        if config.rendering.cache_bytes > 0
        else None
    )

    app.add_middleware(_ShareResponsesNotStored)
    app.add_middleware(AuditMiddleware, writer=writer)
    app.add_middleware(_MetricsMiddleware, requests=requests, latency=latency)
    # Outermost: the client's address is settled before anything records or counts it.
    app.add_middleware(TrustedProxies, trusted=config.trusted_proxies)
    # Before everything: an oversized request line or header costs nothing further.
    app.add_middleware(RequestLimitsMiddleware, limits=config.request_limits)

    app.mount("/metrics", make_asgi_app(registry=scraped))
    return app
