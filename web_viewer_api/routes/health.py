"""Liveness/readiness: 200 once every component this API can see is ready."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Readiness of every component")
def healthz(request: Request) -> JSONResponse:
    checks: dict[str, str] = {}
    for name, probe in request.app.state.config.readiness_probes.items():
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - a failing probe is reported, not raised
            checks[name] = f"unavailable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "components": checks},
        status_code=200 if ready else 503,
    )
