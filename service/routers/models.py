"""``GET /v1/models`` and ``POST /v1/models/{name}/reload``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path

from models import ZOO

from ..deps import ApiKeyDep, RegistryDep
from ..registry import ModelRegistry, ServedModel
from ..schemas import ErrorResponse, ModelDetails, ModelsResponse, PublishedAP, ReloadRequest, ReloadResponse

router = APIRouter(prefix="/v1/models", tags=["models"])

_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}


def model_details(registry: ModelRegistry, served: ServedModel) -> ModelDetails:
    predictor = served.predictor
    info = predictor.info
    cfg = info.config
    entry = ZOO.get(info.zoo_key) if info.zoo_key else None
    return ModelDetails(
        name=served.name,
        arch=cfg.arch,
        zoo_key=info.zoo_key,
        source_sha256=info.source_sha256,
        generation=served.generation,
        provenance=info.provenance,
        roles=registry.roles_of(served.name),
        has_masks=predictor.has_masks,
        baked=info.baked,
        device=str(predictor.device),
        image_scale=[cfg.max_size, cfg.min_size],
        source=served.source,
        loaded_at=served.loaded_at,
        published=PublishedAP(box_ap=entry.box_ap, mask_ap=entry.mask_ap) if entry else None,
        classes=list(predictor.classes),
        category_ids=list(predictor.category_ids),
    )


@router.get(
    "",
    response_model=ModelsResponse,
    responses={503: {"model": ErrorResponse, "description": "models still loading", "headers": _RETRY_AFTER}},
)
async def list_models(registry: RegistryDep) -> ModelsResponse:
    """Loaded models with their classes, provenance and published COCO AP."""
    registry.require_ready()
    return ModelsResponse(models=[model_details(registry, m) for m in registry.models()])


@router.post(
    "/{name}/reload",
    response_model=ReloadResponse,
    responses={
        400: {"model": ErrorResponse, "description": "source outside the model store"},
        401: {"model": ErrorResponse, "description": "API key missing or wrong"},
        403: {"model": ErrorResponse, "description": "reloads disabled (no API key configured)"},
        404: {"model": ErrorResponse, "description": "no such model loaded, or no such file in the store"},
        422: {"model": ErrorResponse, "description": "bad checkpoint (the old model keeps serving) or bad body"},
        503: {"model": ErrorResponse, "description": "models still loading", "headers": _RETRY_AFTER},
    },
)
async def reload_model(
    name: Annotated[str, Path(max_length=256, description="served model name")],
    registry: RegistryDep,
    _auth: ApiKeyDep,
    body: Annotated[ReloadRequest | None, Body()] = None,
) -> ReloadResponse:
    """Atomically swap a model to a checkpoint from the model store (API key required).

    The new checkpoint is validated, loaded and warmed up while the old one keeps serving; a
    checkpoint that fails any step is refused and nothing changes.
    """
    before, new = await registry.reload(name, body.source if body else None)
    return ReloadResponse(
        model=model_details(registry, new),
        previous_generation=before.generation,
        previous_source_sha256=before.predictor.info.source_sha256,
    )


