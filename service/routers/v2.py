"""The Open Inference Protocol v2 (KServe v2 / Triton HTTP/REST) on the same app.

``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]``
(metadata), ``.../ready`` and ``POST .../infer``; tensors and layouts in :mod:`service.oip`.
Every answer goes through the same pipeline as ``/v1`` (batching, limits, metrics); errors are
``{"error": message}`` with ``/v1``'s statuses, and health bodies are KServe's JSON
(``{"live": true}``), which Triton clients accept too (they read only the status).
A model's version is its model-store version (``"1"`` for a model that has none).
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response

import gnws
from gnws.request import RequestParams, params
from gnws.request.errors import BadRequestError, UnknownModelError

from .. import oip
from ..deps import PipelineDep, RegistryDep, SettingsDep
from ..inference import InferencePipeline
from ..registry import ModelRegistry, ServedModel
from ..schemas import ProtocolError
from ..settings import Settings
from ..uploads import read_body

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])
# Model metadata: its own router, which the app protects with the API key when ``models_need_key`` is set.
metadata_router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])

NameP = Annotated[str, Path(max_length=256, description="served model name")]
VersionP = Annotated[str, Path(max_length=32, description="model version (its model-store version, or 1)")]

_PARAMETERS = {
    "type": "object",
    "description": "score_threshold, max_detections, classes (comma-separated), binary_data_output; others "
    "are ignored",
    "properties": {
        "score_threshold": {"type": "number", "minimum": params.SCORE_THRESHOLD_MIN,
                            "maximum": params.SCORE_THRESHOLD_MAX},
        "max_detections": {"type": "integer", "minimum": 0, "maximum": params.MAX_DETECTIONS_LIMIT},
        "classes": {"type": "string", "maxLength": params.CLASSES_MAX_LENGTH},
        "binary_data_output": {"type": "boolean"},
    },
    "additionalProperties": {"type": ["string", "number", "boolean"]},
}
# The JSON form documented here carries one image (base64); batches of images and raw bytes go in the
# binary tensor data extension (a JSON header then the tensor bytes, Inference-Header-Content-Length),
# which is how Triton's and KServe's clients send them.
_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "an inference request: this JSON, or a JSON header of Inference-Header-Content-Length "
        "bytes followed by the binary tensor data (IMAGE: BYTES [N], each element a 4-byte little-endian length "
        "and an encoded image)",
        "content": {
            "application/json": {"schema": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string", "maxLength": oip.MAX_ID_LENGTH},
                    "parameters": _PARAMETERS,
                    "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                        "type": "object",
                        "required": ["name", "shape", "datatype", "data"],
                        "properties": {
                            "name": {"type": "string", "enum": [oip.INPUT_NAME]},
                            "datatype": {"type": "string", "enum": ["BYTES"]},
                            "shape": {"type": "array", "minItems": 1, "maxItems": 1,
                                      "items": {"type": "integer", "minimum": 1, "maximum": 1}},
                            "data": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                                "type": "string", "format": "byte", "contentEncoding": "base64",
                                "contentMediaType": "image/*"}},
                        },
                    }},
                    "outputs": {"type": "array", "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string", "enum": list(oip.DATATYPES)},
                            "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}},
                        },
                    }},
                },
            }},
        },
    }
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}
_INFER_OK: dict[int | str, dict[str, Any]] = {
    200: {"description": "the outputs: JSON, or (binary data asked for) a JSON header of Inference-Header-Content-"
          "Length bytes followed by the binary tensors",
          "content": {"application/json": {"schema": {"type": "object"}},
                      "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
}
OIP_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ProtocolError, "description": "malformed request, tensors or image"},
    401: {"model": ProtocolError, "description": "API key missing or wrong (model metadata, when models_need_key)"},
    404: {"model": ProtocolError, "description": "no such model or version"},
    408: {"model": ProtocolError, "description": "the body did not arrive in time"},
    413: {"model": ProtocolError, "description": "body over the upload limit, or too many pixels"},
    422: {"model": ProtocolError, "description": "invalid parameters"},
    429: {"model": ProtocolError, "description": "queue full; retry later", "headers": _RETRY_AFTER},
    503: {"model": ProtocolError, "description": "not ready, or the request timed out", "headers": _RETRY_AFTER},
}
_NOT_READY: dict[int | str, dict[str, Any]] = {503: OIP_ERRORS[503]}


def served_version(served: ServedModel) -> str:
    return str(served.version) if served.version is not None else "1"


def _model(registry: ModelRegistry, name: str, version: str | None) -> ServedModel:
    served = registry.get(name, "detect")
    check_version(served, version)
    return served


def check_version(served: ServedModel, version: str | None) -> None:
    if version is not None and version != served_version(served):
        raise UnknownModelError(
            f"version {version} of {served.name} is not loaded; it serves version {served_version(served)}"
        )


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "gnws", "version": gnws.__version__, "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="Server liveness", responses=_NOT_READY)
async def live(registry: RegistryDep) -> JSONResponse:
    if registry.state == "failed":
        return JSONResponse({"error": f"the server could not load its models: {registry.failure}"}, status_code=503)
    return JSONResponse({"live": True})


@router.get("/health/ready", summary="Server readiness", responses=_NOT_READY)
async def ready(registry: RegistryDep) -> dict[str, bool]:
    registry.require_ready()  # 503 with the reason (and Retry-After while loading)
    return {"ready": True}


def _metadata(registry: ModelRegistry, name: str, version: str | None) -> dict[str, Any]:
    served = _model(registry, name, version)
    return oip.model_metadata(name, served_version(served), served.predictor.has_masks,
                              getattr(served.predictor, "precision", "fp32"))


def _ready(registry: ModelRegistry, name: str, version: str | None) -> dict[str, Any]:
    _model(registry, name, version)
    return {"name": name, "ready": True}


async def _infer(pipeline: InferencePipeline, settings: Settings, request: Request, name: str,
                 version: str | None) -> Response:
    served, _ = pipeline.check(None, RequestParams(model=name))  # 404/503/429 before the body is read
    check_version(served, version)
    body = await pipeline.receive(partial(read_body, request, settings.upload_limits()))
    body = oip.inflate(body, request.headers.get("content-encoding"), settings.max_upload_bytes)
    parsed = oip.parse_infer_request(body, request.headers.get(oip.HEADER_LENGTH), max_images=settings.max_files)
    fields = {k: parsed.parameters[k] for k in oip.PARAMETER_NAMES if k in parsed.parameters}
    served, bound = pipeline.check(None, RequestParams.from_fields({**fields, "model": name}))
    names = oip.output_names(served.predictor.has_masks)
    if parsed.outputs is not None:
        unknown = sorted(set(parsed.outputs) - set(oip.DATATYPES))
        if unknown:
            raise BadRequestError(f"unknown outputs {unknown}; {name} has {list(names)}")
        # asked for by name, masks_rle comes from a model without masks too: empty strings
        names = tuple(n for n in oip.DATATYPES if n in parsed.outputs)
    outcome = await pipeline.run(served, bound, parsed.images)
    tensors = oip.detection_tensors(outcome.document()["images"], names)
    content, headers = oip.infer_response(name, served_version(served), parsed, tensors)
    return Response(content=content, headers=headers)


@metadata_router.get("/models/{name}", summary="Model metadata", responses=OIP_ERRORS)
async def metadata(name: NameP, registry: RegistryDep) -> dict[str, Any]:
    """The model's input and output tensors."""
    return _metadata(registry, name, None)


@metadata_router.get("/models/{name}/versions/{version}", summary="Model metadata (one version)",
                     responses=OIP_ERRORS)
async def version_metadata(name: NameP, version: VersionP, registry: RegistryDep) -> dict[str, Any]:
    """The model's input and output tensors, for the version it serves."""
    return _metadata(registry, name, version)


@router.get("/models/{name}/ready", summary="Model readiness", responses=OIP_ERRORS)
async def model_ready(name: NameP, registry: RegistryDep) -> dict[str, Any]:
    """200 when the model answers inference requests (404 unknown, 503 not ready)."""
    return _ready(registry, name, None)


@router.get("/models/{name}/versions/{version}/ready", summary="Model readiness (one version)",
            responses=OIP_ERRORS)
async def version_ready(name: NameP, version: VersionP, registry: RegistryDep) -> dict[str, Any]:
    """200 when the model serves this version (404 unknown model or version, 503 not ready)."""
    return _ready(registry, name, version)


@router.post("/models/{name}/infer", summary="Inference", openapi_extra=_INFER_BODY, responses=_INFER_OK | OIP_ERRORS)
async def infer(name: NameP, request: Request, pipeline: PipelineDep, settings: SettingsDep) -> Response:
    """Detections for a batch of encoded images (see :mod:`service.oip` for the tensors)."""
    return await _infer(pipeline, settings, request, name, None)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference (one version)",
             openapi_extra=_INFER_BODY, responses=_INFER_OK | OIP_ERRORS)
async def version_infer(
    name: NameP, version: VersionP, request: Request, pipeline: PipelineDep, settings: SettingsDep
) -> Response:
    """Detections for a batch of encoded images, from the version the model serves."""
    return await _infer(pipeline, settings, request, name, version)
