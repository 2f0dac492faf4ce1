"""`create_app(config, index, store)`: the FastAPI application, built from explicit values."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CollectorRegistry, Histogram, make_asgi_app
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from storage import IndexRepository, ObjectStore
from web_viewer_api.dicomweb.stow import StowTarget
from web_viewer_api.errors import install_error_handlers
from web_viewer_api.routes import dicomweb, health

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


class _QuarantineCollector(Collector):
    """Instances in quarantine, by reason, read from the reason files at scrape time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("dicom_gateway_quarantined_instances",
                                  "Instances the worker refused, by reason", labels=["reason"])
        counts: Counter[str] = Counter()
        for path in self.folder.glob("*/*/*.reason.json"):
            try:
                counts[str(json.loads(path.read_text()).get("reason", "unknown"))] += 1
            except (OSError, ValueError):
                counts["unreadable"] += 1
        for reason, count in sorted(counts.items()):
            gauge.add_metric([reason], count)
        yield gauge


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
        status = {"code": 500}

        async def send_with_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(scope.get("method", ""), path, str(status["code"])).inc()
            self.latency.labels(path).observe(time.perf_counter() - started)


def create_app(config: ApiConfig, index: IndexRepository, store: ObjectStore) -> FastAPI:
    """Build the API; nothing connects until a request arrives."""
    if not config.admin_token:
        raise ValueError("an admin token is required")
    app = FastAPI(
        title="dicom-gateway",
        version="0.1.0",
        description="DICOMweb, share links and audit for de-identified studies.",
    )
    probes = {"index": index.check, "object_store": store.check, **config.readiness_probes}
    app.state.config = ApiConfig(config.admin_token, probes, config.quarantine_dir,
                                 config.public_url, config.stow, config.cors_origins)
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(config.cors_origins), allow_credentials=False,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Accept", "Content-Type", "If-None-Match"],
            expose_headers=["Warning", "ETag", "Content-Type", "Content-Encoding"], max_age=600)
    app.state.index = index
    app.state.store = store
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(dicomweb.router)

    registry = CollectorRegistry()
    if config.quarantine_dir is not None:
        registry.register(_QuarantineCollector(config.quarantine_dir))
    requests = PromCounter(
        "dicom_gateway_http_requests_total", "HTTP requests", ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram(
        "dicom_gateway_http_request_seconds", "HTTP request latency", ["route"], registry=registry
    )

    app.add_middleware(_MetricsMiddleware, requests=requests, latency=latency)

    app.mount("/metrics", make_asgi_app(registry=registry))
    return app
