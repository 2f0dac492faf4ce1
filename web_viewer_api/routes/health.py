"""Liveness and readiness: /livez answers while the process serves requests; /readyz (and
/healthz, the contract's name) answer 200 once every component this API depends on is
reachable — index, object store, broker, and under `serve` the node and worker."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["operations"])


@router.get("/livez", summary="Liveness: the process answers")
async def livez() -> JSONResponse:
    return JSONResponse({"status": "alive"})


@router.get("/readyz", summary="Readiness of every component")
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
