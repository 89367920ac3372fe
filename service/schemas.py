"""Request and response bodies of the HTTP API (they are the OpenAPI schema clients validate against)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: a message saying what was wrong and how to fix it.

    ``detail`` is a list only for FastAPI's own request validation errors (422).
    """

    detail: str | list[Any]


class RLE(BaseModel):
    """COCO compressed run-length encoding of a mask (column-major, ``pycocotools`` format)."""

    size: list[int] = Field(description="[height, width] of the image")
    counts: str


class Detection(BaseModel):
    """One detection in COCO results format, plus ``bbox_xyxy`` and ``category_name``."""

    bbox: list[float] = Field(description="[x, y, width, height] in original image pixels")
    bbox_xyxy: list[float] = Field(description="[x1, y1, x2, y2] in original image pixels")
    score: float
    category_id: int = Field(description="COCO category id")
    category_name: str
    segmentation: RLE | None = Field(default=None, description="instance mask (/v1/segment only)")
    polygons: list[list[float]] | None = Field(
        default=None, description="mask outlines as [x1, y1, x2, y2, ...] lists (/v1/segment?polygons=true)"
    )


class Timings(BaseModel):
    """Milliseconds spent per stage for one image (``inference`` is shared by its whole batch)."""

    prepare_ms: float = Field(description="decode, EXIF orientation, resize, normalise, pad")
    queue_ms: float = Field(description="waiting for a forward pass")
    inference_ms: float = Field(description="the forward pass")
    encode_ms: float = Field(description="filtering and COCO/RLE encoding")


class ImageResult(BaseModel):
    index: int = Field(description="position of the image in the request")
    filename: str | None = Field(default=None, description="multipart file name, if any")
    width: int = Field(description="width after EXIF orientation")
    height: int = Field(description="height after EXIF orientation")
    batch_size: int = Field(description="images in the forward pass this image was part of")
    timings: Timings
    detections: list[Detection]


class PublishedAP(BaseModel):
    """COCO val2017 AP published by mmdetection for the zoo checkpoint."""

    box_ap: float
    mask_ap: float | None = None


class ModelSummary(BaseModel):
    """Which model answered, and where its weights came from."""

    name: str
    arch: str
    zoo_key: str | None = None
    source_sha256: str | None = None
    generation: int = Field(description="0 at startup, +1 per reload")
    provenance: dict[str, Any]


class DetectResponse(BaseModel):
    model: ModelSummary
    images: list[ImageResult]


class ModelDetails(ModelSummary):
    roles: list[Literal["detect", "segment"]] = Field(description="endpoints using it by default")
    has_masks: bool
    baked: bool
    device: str
    image_scale: list[int] = Field(description="[max_size, min_size] of the test-time resize")
    source: str = Field(description="file or zoo key it was loaded from")
    loaded_at: float = Field(description="UNIX time of the (re)load")
    published: PublishedAP | None = None
    classes: list[str]
    category_ids: list[int]


class ModelsResponse(BaseModel):
    models: list[ModelDetails]


class ReloadRequest(BaseModel):
    """Where to reload from: a zoo key or a ``.safetensors`` file name/path inside the model store."""

    source: str | None = Field(
        default=None,
        max_length=1024,
        description="default: <model store>/<name>.safetensors",
        examples=["faster_rcnn_r50_fpn_gn_ws-all_1x_coco", "finetuned/faster_rcnn_r50_city.safetensors"],
    )


class ReloadResponse(BaseModel):
    model: ModelDetails
    previous_generation: int
    previous_source_sha256: str | None = None


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "ready", "failed", "stopping"]
    detail: str | None = None
