"""`create_app(config, index, store)`: the FastAPI application, built from explicit values."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, make_asgi_app

from storage import IndexRepository, ObjectStore
from web_viewer_api.errors import install_error_handlers
from web_viewer_api.routes import dicomweb, health

Probe = Callable[[], None]


@dataclass(frozen=True)
class ApiConfig:
    """What the API needs from the settings."""

    admin_token: str
    readiness_probes: Mapping[str, Probe] = field(default_factory=dict)


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
    app.state.config = ApiConfig(config.admin_token, probes)
    app.state.index = index
    app.state.store = store
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(dicomweb.router)

    registry = CollectorRegistry()
    requests = Counter(
        "dicom_gateway_http_requests_total", "HTTP requests", ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram(
        "dicom_gateway_http_request_seconds", "HTTP request latency", ["route"], registry=registry
    )

    @app.middleware("http")
    async def _metrics(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        requests.labels(request.method, path, str(response.status_code)).inc()
        latency.labels(path).observe(time.perf_counter() - started)
        return response

    app.mount("/metrics", make_asgi_app(registry=registry))
    return app
