"""FastAPI dependencies (``Annotated`` aliases), all overridable with ``app.dependency_overrides``."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from gnws.request.errors import AuthenticationError, ReloadDisabledError

from .inference import InferencePipeline
from .metrics import Metrics
from .registry import ModelRegistry
from .settings import Settings


@dataclass
class ServiceState:
    """Everything a request handler needs, built by :func:`service.app.create_app`."""

    settings: Settings
    metrics: Metrics
    registry: ModelRegistry
    pipeline: InferencePipeline


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.gnws
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


def get_settings(state: StateDep) -> Settings:
    return state.settings


def get_registry(state: StateDep) -> ModelRegistry:
    return state.registry


def get_metrics(state: StateDep) -> Metrics:
    return state.metrics


def get_pipeline(state: StateDep) -> InferencePipeline:
    return state.pipeline


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
PipelineDep = Annotated[InferencePipeline, Depends(get_pipeline)]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the server's GNWS_API_KEY")
_bearer = HTTPBearer(auto_error=False, description="the server's GNWS_API_KEY as a bearer token")


def require_api_key(
    settings: SettingsDep,
    header_key: Annotated[str | None, Security(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """Admin endpoints (and, when the operator asks for it, the metrics and model listings): the
    request must carry the configured API key (``X-API-Key`` or bearer)."""
    if settings.api_key is None:
        raise ReloadDisabledError("this server has no API key configured (GNWS_API_KEY), so reloads are disabled")
    _check_key(settings, header_key, bearer)


ApiKeyDep = Annotated[None, Depends(require_api_key)]


def _check_key(settings: Settings, header_key: str | None, bearer: HTTPAuthorizationCredentials | None) -> None:
    if settings.api_key is None:  # pragma: no cover - require_api_key refuses first
        raise ReloadDisabledError("this server has no API key configured (GNWS_API_KEY)")
    given = header_key or (bearer.credentials if bearer else None)
    if not given:
        raise AuthenticationError("this endpoint needs the API key: send it as X-API-Key or Authorization: Bearer")
    if not hmac.compare_digest(given.encode(), settings.api_key.get_secret_value().encode()):
        raise AuthenticationError("the API key is wrong")
