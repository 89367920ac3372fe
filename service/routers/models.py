"""``GET /v1/models`` and ``POST /v1/models/{name}/reload``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import ValidationError

from gnws.request import model_summary
from gnws.request.errors import BadRequestError, InvalidParameterError
from models import ZOO

from ..deps import ApiKeyDep, RegistryDep, SettingsDep
from ..registry import ModelRegistry, ServedModel
from ..schemas import ErrorResponse, ModelsResponse, ReloadRequest, ReloadResponse
from ..uploads import read_body

router = APIRouter(prefix="/v1/models", tags=["models"])
# Its own router: the app adds the API-key dependency to it when ``models_need_key`` is set.
listing_router = APIRouter(prefix="/v1/models", tags=["models"])

_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}


def model_details(registry: ModelRegistry, served: ServedModel) -> dict[str, Any]:
    """One entry of ``GET /v1/models``: the response documents' model summary and what the service adds."""
    predictor = served.predictor
    cfg = predictor.info.config
    entry = ZOO.get(predictor.info.zoo_key) if predictor.info.zoo_key else None
    return {
        **model_summary(served.name, predictor, generation=served.generation, version=served.version),
        "roles": registry.roles_of(served.name),
        "has_masks": predictor.has_masks,
        "baked": predictor.info.baked,
        "device": str(predictor.device),
        "image_scale": [cfg.max_size, cfg.min_size],
        "source": served.source,
        "versions": registry.versions_of(served) or None,
        "pinned": served.pinned,
        "loaded_at": served.loaded_at,
        "published": {"box_ap": entry.box_ap, "mask_ap": entry.mask_ap} if entry else None,
        "classes": list(predictor.classes),
        "category_ids": list(predictor.category_ids),
    }


@listing_router.get(
    "",
    response_model=ModelsResponse,
    responses={
        401: {"model": ErrorResponse, "description": "API key missing or wrong (when models_need_key is set)"},
        503: {"model": ErrorResponse, "description": "models still loading", "headers": _RETRY_AFTER},
    },
)
async def list_models(registry: RegistryDep) -> ModelsResponse:
    """Loaded models with their classes, versions, provenance and published COCO AP."""
    registry.require_ready()
    return ModelsResponse.model_validate({"models": [model_details(registry, m) for m in registry.models()]})


_RELOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "content": {"application/json": {"schema": ReloadRequest.model_json_schema()}},
    }
}


@router.post(
    "/{name}/reload",
    response_model=ReloadResponse,
    openapi_extra=_RELOAD_BODY,
    responses={
        400: {"model": ErrorResponse, "description": "source is not a usable file name in the model store"},
        401: {"model": ErrorResponse, "description": "API key missing or wrong"},
        403: {"model": ErrorResponse, "description": "reloads disabled (no API key configured)"},
        404: {"model": ErrorResponse, "description": "no such model loaded, or no such file in the store"},
        409: {"model": ErrorResponse, "description": "the file is another architecture (replace_architecture)"},
        413: {"model": ErrorResponse, "description": "body over max_json_bytes"},
        422: {"model": ErrorResponse, "description": "bad checkpoint (the old model keeps serving) or bad body"},
        503: {"model": ErrorResponse, "description": "models still loading", "headers": _RETRY_AFTER},
    },
)
async def reload_model(
    name: Annotated[str, Path(max_length=256, description="served model name")],
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    _auth: ApiKeyDep,
) -> ReloadResponse:
    """Atomically swap a model to a file from the model store (API key required).

    The API key is checked before the body is read, and the body is read only up to
    ``max_json_bytes``. The new file is validated, loaded and warmed up while the old model keeps
    serving; a file that fails any step is refused and nothing changes.
    """
    body = await read_body(request, settings.json_limits())
    try:
        reload = ReloadRequest.model_validate_json(body) if body.strip() else ReloadRequest()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise BadRequestError(f"the body is not JSON: {problems}") from None
        raise InvalidParameterError(f"invalid reload request: {problems}") from None
    before, new = await registry.reload(name, reload.source, version=reload.version,
                                        replace_architecture=reload.replace_architecture)
    return ReloadResponse.model_validate({
        "model": model_details(registry, new),
        "previous_generation": before.generation,
        "previous_source_sha256": before.predictor.info.source_sha256,
    })
