"""``POST /v1/detect`` and ``POST /v1/segment`` (also at ``/detect`` and ``/segment``)."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from gnws.request import MEDIA_TYPES, ImageFormat, RequestParams, Role, params

from ..deps import PipelineDep
from ..inference import InferencePipeline
from ..schemas import DetectResponse, ErrorResponse
from ..uploads import read_uploads

router = APIRouter(tags=["inference"])

_BINARY = {"type": "string", "format": "binary"}
# What the decoder reads (models.preprocess.DECODABLE_FORMATS); application/octet-stream is read the same way.
IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/bmp", "image/gif", "image/tiff", "image/webp")
IMAGE_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "one or several images as multipart files (any field name), or one image as the raw body",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": _BINARY}, "required": ["file"]},
                "encoding": {"file": {"contentType": ", ".join(IMAGE_MEDIA_TYPES)}},
            },
            **{media_type: {"schema": _BINARY} for media_type in IMAGE_MEDIA_TYPES},
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

ModelQ = Annotated[
    str | None, Query(min_length=1, max_length=params.MODEL_NAME_MAX_LENGTH, description=params.DESCRIPTIONS["model"])
]
ScoreQ = Annotated[
    float | None,
    Query(ge=params.SCORE_THRESHOLD_MIN, le=params.SCORE_THRESHOLD_MAX,
          description=params.DESCRIPTIONS["score_threshold"]),
]
MaxDetQ = Annotated[
    int | None, Query(ge=0, le=params.MAX_DETECTIONS_LIMIT, description=params.DESCRIPTIONS["max_detections"])
]
ClassesQ = Annotated[list[str] | None, Query(description=params.DESCRIPTIONS["classes"])]
FormatQ = Annotated[ImageFormat, Query(description=params.DESCRIPTIONS["format"])]
PolygonsQ = Annotated[bool, Query(description=params.DESCRIPTIONS["polygons"])]


async def answer(pipeline: InferencePipeline, request: Request, role: Role, query: RequestParams) -> Response:
    """Run the request and answer with its JSON document, or the drawn image for ``format=png|jpeg``."""
    served, bound = pipeline.check(role, query)
    settings = pipeline.settings
    uploads = await pipeline.receive(partial(read_uploads, request, settings.upload_limits(),
                                             max_files=settings.max_files))
    outcome = await pipeline.run(served, bound, uploads)
    if query.format != "json":
        return Response(content=await pipeline.draw(outcome), media_type=MEDIA_TYPES[query.format])
    return JSONResponse(outcome.document())


async def detect(
    request: Request,
    pipeline: PipelineDep,
    model: ModelQ = None,
    score_threshold: ScoreQ = None,
    max_detections: MaxDetQ = None,
    classes: ClassesQ = None,
    format: FormatQ = "json",  # noqa: A002 - the public query parameter name
) -> Response:
    """Boxes in COCO results format for each uploaded image."""
    query = RequestParams(model=model, score_threshold=score_threshold, max_detections=max_detections,
                          classes=tuple(classes or ()), format=format)
    return await answer(pipeline, request, "detect", query)


async def segment(
    request: Request,
    pipeline: PipelineDep,
    model: ModelQ = None,
    score_threshold: ScoreQ = None,
    max_detections: MaxDetQ = None,
    classes: ClassesQ = None,
    format: FormatQ = "json",  # noqa: A002 - the public query parameter name
    polygons: PolygonsQ = False,
) -> Response:
    """Boxes and instance masks (COCO compressed RLE, optional polygons) for each uploaded image."""
    query = RequestParams(model=model, score_threshold=score_threshold, max_detections=max_detections,
                          classes=tuple(classes or ()), format=format, polygons=polygons)
    return await answer(pipeline, request, "segment", query)


for _prefix, _in_schema in (("/v1", True), ("", False)):
    for _path, _endpoint in (("/detect", detect), ("/segment", segment)):
        router.add_api_route(
            f"{_prefix}{_path}",
            _endpoint,
            methods=["POST"],
            response_model=DetectResponse,  # the schema of the document; answers are built once, not re-validated
            responses=RESPONSES,
            openapi_extra=IMAGE_REQUEST_BODY,
            include_in_schema=_in_schema,
            operation_id=f"{_path.strip('/')}{'_v1' if _prefix else ''}",
            summary=f"{_path.strip('/').capitalize()} objects in images",
        )
