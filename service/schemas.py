"""Request and response bodies of the HTTP API (they are the OpenAPI schema clients validate against)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: a message saying what was wrong and how to fix it.

    ``detail`` is a list only for FastAPI's own request validation errors (422).
    """

    detail: str | list[Any]


class ProtocolError(BaseModel):
    """Every 4xx/5xx body under ``/v2`` (the Open Inference Protocol's error shape)."""

    error: str


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
    worker: str | None = Field(default=None, description="the inference replica that ran its forward pass "
                               "(Ray Serve deployments: replica id @ node id)")
    timings: Timings
    detections: list[Detection]


class PublishedAP(BaseModel):
    """COCO val2017 AP published by mmdetection for the zoo checkpoint."""

    box_ap: float
    mask_ap: float | None = None


class ModelSummary(BaseModel):
    """Which model answered, and where its weights came from (names and digests, never server paths)."""

    name: str
    arch: str
    zoo_key: str | None = None
    source_sha256: str | None = None
    version: int | None = Field(default=None, description="model-store version of the weights (versioned models)")
    generation: int = Field(description="0 at startup, +1 per reload")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="numeric precision of the forward pass (fp32: exact)"
    )
    provenance: dict[str, Any] = Field(description="where the weights came from (file paths shown as names)")


class DetectResponse(BaseModel):
    model: ModelSummary
    images: list[ImageResult]


class ModelDetails(ModelSummary):
    roles: list[Literal["detect", "segment"]] = Field(description="endpoints using it by default")
    has_masks: bool
    baked: bool
    device: str
    image_scale: list[int] = Field(description="[max_size, min_size] of the test-time resize")
    source: str = Field(description="what it was loaded from: a zoo key or a file name in the model store")
    versions: list[int] | None = Field(default=None, description="the versions in the store (versioned models)")
    pinned: bool = Field(default=False, description="a reload chose this version: the store watcher leaves it")
    loaded_at: float = Field(description="UNIX time of the (re)load")
    published: PublishedAP | None = None
    classes: list[str]
    category_ids: list[int]


class ModelsResponse(BaseModel):
    models: list[ModelDetails]


# A zoo key or a model-store file name: runs of letters and digits joined by single ".", "_", "-" or "/"
# (so no "..", no leading "/", nothing outside the store can be named).
SOURCE_PATTERN = r"^[A-Za-z0-9]+(?:[._/-][A-Za-z0-9]+)*$"


class ReloadRequest(BaseModel):
    """What to reload from; every field is optional (``{}``: the served name's newest file in the store)."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        pattern=SOURCE_PATTERN,
        description="a zoo key, a model-store name (its newest version) or a .safetensors file name inside the "
        "model store; default: the served name",
        examples=["faster_rcnn_r50_fpn_gn_ws-all_1x_coco", "coco-ft", "coco-ft/2.safetensors"],
    )
    version: int | None = Field(
        default=None,
        ge=1,
        description="a version of the served versioned model (or of `source`): a rollback (or roll-forward) "
        "to it. The store watcher then keeps this version until a reload without `version`",
    )
    replace_architecture: bool = Field(
        default=False,
        description="allow a file of another architecture (e.g. a Mask R-CNN behind a Faster R-CNN name)",
    )


class ReloadResponse(BaseModel):
    model: ModelDetails
    previous_generation: int
    previous_source_sha256: str | None = None


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "ready", "failed", "stopping"]
    detail: str | None = None
