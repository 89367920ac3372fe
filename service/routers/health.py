"""``GET /healthz`` (live), ``GET /readyz`` (models loaded and warmed) and ``GET /metrics``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import MetricsDep, RegistryDep, SettingsDep
from ..schemas import HealthResponse

router = APIRouter(tags=["health"])
# Its own router: the app adds the API-key dependency to it when ``metrics_need_key`` is set.
metrics_router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "model loading failed: restart the process"}},
)
async def healthz(registry: RegistryDep) -> HealthResponse | JSONResponse:
    """Liveness: the process answers (503 only when loading the models failed for good)."""
    if registry.state == "failed":
        body = HealthResponse(status="failed", detail=registry.failure)
        return JSONResponse(body.model_dump(), status_code=503)
    return HealthResponse(status="ok")


@router.get(
    "/readyz",
    response_model=HealthResponse,
    responses={
        503: {
            "model": HealthResponse,
            "description": "loading, failed or shutting down",
            "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}},
        }
    },
)
async def readyz(registry: RegistryDep, settings: SettingsDep) -> HealthResponse | JSONResponse:
    """Readiness: 200 once every model is loaded and warmed up, else 503 (with ``Retry-After`` unless failed)."""
    if registry.ready:
        return HealthResponse(status="ready")
    body = HealthResponse(status=registry.state, detail=registry.failure)
    headers = {} if registry.state == "failed" else {"Retry-After": str(settings.retry_after_s)}
    return JSONResponse(body.model_dump(), status_code=503, headers=headers)


@metrics_router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"}},
)
async def metrics(m: MetricsDep) -> Response:
    """Prometheus metrics."""
    return Response(content=m.render(), media_type=CONTENT_TYPE_LATEST)
