"""``POST /v1/detect`` and ``POST /v1/segment`` (also at ``/detect`` and ``/segment``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from ..deps import PipelineDep
from ..inference import ImageFormat, InferenceParams
from ..schemas import DetectResponse, ErrorResponse

router = APIRouter(tags=["inference"])

_BINARY = {"type": "string", "format": "binary"}
IMAGE_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "one or several images as multipart files (any field name), or one image as the raw body",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": _BINARY}, "required": ["file"]},
            },
            "image/jpeg": {"schema": _BINARY},
            "image/png": {"schema": _BINARY},
            "application/octet-stream": {"schema": _BINARY},
        },
    }
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "detections (JSON), or the annotated image for format=png|jpeg",
        "content": {"image/png": {"schema": _BINARY}, "image/jpeg": {"schema": _BINARY}},
    },
    400: {"model": ErrorResponse, "description": "empty, corrupt, truncated or non-image upload; malformed form"},
    404: {"model": ErrorResponse, "description": "no such model loaded"},
    408: {"model": ErrorResponse, "description": "the upload did not arrive within the request timeout"},
    413: {"model": ErrorResponse, "description": "body over the upload limit, or too many pixels"},
    415: {"model": ErrorResponse, "description": "body is neither multipart nor an image"},
    422: {"model": ErrorResponse, "description": "invalid query parameters"},
    429: {"model": ErrorResponse, "description": "queue full; retry later", "headers": _RETRY_AFTER},
    503: {"model": ErrorResponse, "description": "not ready, or the request timed out", "headers": _RETRY_AFTER},
}

ModelQ = Annotated[str | None, Query(max_length=256, description="served model name (default: the endpoint's)")]
ScoreQ = Annotated[float | None, Query(ge=0.0, le=1.0, description="drop detections scoring below this")]
MaxDetQ = Annotated[int | None, Query(ge=0, le=1000, description="keep at most this many (the best scoring)")]
ClassesQ = Annotated[
    list[str] | None,
    Query(description="only these classes: names or COCO category ids, repeated or comma-separated"),
]
FormatQ = Annotated[ImageFormat, Query(description="json, or png/jpeg for the image with detections drawn")]
PolygonsQ = Annotated[bool, Query(description="also return mask outlines as polygons")]


async def detect(
    request: Request,
    pipeline: PipelineDep,
    model: ModelQ = None,
    score_threshold: ScoreQ = None,
    max_detections: MaxDetQ = None,
    classes: ClassesQ = None,
    format: FormatQ = "json",  # noqa: A002 - the public query parameter name
) -> DetectResponse | Response:
    """Boxes in COCO results format for each uploaded image."""
    params = InferenceParams(model=model, score_threshold=score_threshold, max_detections=max_detections,
                             classes=tuple(classes or ()), format=format)
    return await pipeline.handle(request, "detect", params)


async def segment(
    request: Request,
    pipeline: PipelineDep,
    model: ModelQ = None,
    score_threshold: ScoreQ = None,
    max_detections: MaxDetQ = None,
    classes: ClassesQ = None,
    format: FormatQ = "json",  # noqa: A002 - the public query parameter name
    polygons: PolygonsQ = False,
) -> DetectResponse | Response:
    """Boxes and instance masks (COCO compressed RLE, optional polygons) for each uploaded image."""
    params = InferenceParams(model=model, score_threshold=score_threshold, max_detections=max_detections,
                             classes=tuple(classes or ()), format=format, polygons=polygons)
    return await pipeline.handle(request, "segment", params)


for _prefix, _in_schema in (("/v1", True), ("", False)):
    for _path, _endpoint in (("/detect", detect), ("/segment", segment)):
        router.add_api_route(
            f"{_prefix}{_path}",
            _endpoint,
            methods=["POST"],
            response_model=DetectResponse,
            response_model_exclude_none=True,
            responses=RESPONSES,
            openapi_extra=IMAGE_REQUEST_BODY,
            include_in_schema=_in_schema,
            operation_id=f"{_path.strip('/')}{'_v1' if _prefix else ''}",
            summary=f"{_path.strip('/').capitalize()} objects in images",
        )
