"""TorchServe handler serving a gnws detector with the same JSON as the HTTP service.

An adapter over the request layer (:mod:`gnws.request`), like the FastAPI routes: parameters,
selection, encoding, drawing, the response document and the error statuses are all the request
layer's, so each response is what the service's ``/v1/detect`` (or, for a Mask R-CNN,
``/v1/segment``) answers for a one-image request, field for field. ``generation`` is 0 (the
service counts hot reloads; TorchServe here has none, the model API is off). Errors are
``{"detail": message}`` with the service's statuses.

Query parameters as in the service: ``score_threshold``, ``max_detections``, ``classes``,
``polygons`` (masks only), ``format`` and ``model`` (must be this model: TorchServe picks the model
from the URL). TorchServe 0.12 hands a handler the query string only on ``POST
/models/NAME/invoke`` (and the legacy ``/NAME/predict``); ``POST /predictions/NAME`` drops it
(``InferenceRequestHandler.handlePredictions`` parses no query). There, send the same names as
multipart form fields next to the image (``-F file=@x.jpg -F score_threshold=0.3``). Either way
they arrive as fields of the request row, as UTF-8 bytes; a repeated name arrives once (the last
value), so give several classes as ``classes=person,car``.

A TorchServe batch is one list of requests; a request that fails before inference gets its own
4xx response (``context.set_response_status(..., idx)``) while the rest of the batch is answered
normally. Batching never changes results: the predictor groups images by padded shape (GroupNorm
statistics include the padding).

Settings come from the ``handler:`` section of the archive's ``model-config.yaml`` (written by
``gnws archive``): ``device`` (``auto`` = the GPU TorchServe assigned to this worker, else CPU),
``image_scale`` (``[max_size, min_size]``, tests and smoke runs only), ``max_pixels`` and
``precision`` (``fp32``, ``bf16``, ``fp16``).

Shaped like LitServe's loop (decode → batch → infer → unbatch → encode), weights touched only in
:meth:`GnwsHandler.initialize`. Imports the request layer and :mod:`models`, never the web app.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gnws.request import (
    MEDIA_TYPES,
    DetectionRequest,
    RequestParams,
    Role,
    Timings,
    error_document,
    image_entry,
    model_summary,
    response_document,
    status_for,
)
from gnws.request.errors import UnknownModelError, message_of
from models import GnwsError, ImageDecodeError, Predictor, PreparedImage, RawDetections
from models.allocator import tune_malloc
from models.preprocess import DEFAULT_MAX_PIXELS

logger = logging.getLogger(__name__)

# Request fields TorchServe may carry the image in: raw body ("body"/"data") or a multipart field.
IMAGE_FIELDS = ("data", "body", "file", "image")
JSON = MEDIA_TYPES["json"]


def request_image(row: Mapping[str, Any]) -> bytes:
    """The image bytes of one TorchServe request row.

    Raises:
        ImageDecodeError: the request carries no binary image (e.g. a JSON or text body).
    """
    for key in IMAGE_FIELDS:
        value = row.get(key)
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
        if value is not None:
            raise ImageDecodeError(
                f"field {key!r} holds {type(value).__name__}, not image bytes; POST the image file itself "
                "(e.g. curl --data-binary @image.jpg -H 'Content-Type: application/octet-stream')"
            )
    raise ImageDecodeError(
        f"the request has no image; expected the raw image as the body or a form field {IMAGE_FIELDS}"
    )


def resolve_device(setting: str, gpu_id: int | None) -> str:
    """``auto`` → the GPU TorchServe assigned to this worker when CUDA is available, else CPU."""
    if setting != "auto":
        return setting
    if gpu_id is not None and torch.cuda.is_available():
        return f"cuda:{gpu_id}"
    return "cpu"


def parse_image_scale(value: Any) -> tuple[int, int] | None:
    """``[max_size, min_size]`` from model-config.yaml, or ``None`` for the model's own scale."""
    if value is None:
        return None
    if not (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2):
        raise ValueError(f"handler.image_scale must be [max_size, min_size], got {value!r}")
    max_size, min_size = (int(v) for v in value)
    return max_size, min_size


@dataclass
class _Item:
    """One request of a TorchServe batch on its way through the handler."""

    request: DetectionRequest | None = None
    prepared: PreparedImage | None = None
    rgb: np.ndarray | None = None  # kept to draw on for format=png|jpeg
    failure: GnwsError | None = None
    prepare_ms: float = 0.0


class GnwsHandler:
    """TorchServe entry point: ``initialize(context)`` once per worker, ``handle(data, context)`` per batch."""

    def __init__(self) -> None:
        self.predictor: Predictor | None = None
        self.initialized = False

    def initialize(self, context: Any) -> None:
        """Load the baked ``.safetensors`` model shipped as the archive's serialized file."""
        props = context.system_properties
        settings: Mapping[str, Any] = (getattr(context, "model_yaml_config", None) or {}).get("handler") or {}
        serialized = (context.manifest or {}).get("model", {}).get("serializedFile")
        if not serialized:
            raise GnwsError("the model archive has no serialized file; build it with `gnws archive NAME`")
        path = Path(props["model_dir"]) / serialized
        device = resolve_device(str(settings.get("device", "auto")), props.get("gpu_id"))
        tune_malloc()  # forward passes reuse freed memory (models/allocator.py), as in `gnws serve`
        self.predictor = Predictor.load(
            path,
            device=device,
            model_name=str(settings.get("model_name") or context.model_name),
            max_pixels=int(settings.get("max_pixels", DEFAULT_MAX_PIXELS)),
            image_scale=parse_image_scale(settings.get("image_scale")),
            precision=str(settings.get("precision", "fp32")),
        )
        self.initialized = True
        logger.info("loaded %s from %s on %s (batch size %s)", self.predictor.name, path, device,
                    props.get("batch_size"))

    def _loaded(self) -> Predictor:
        if self.predictor is None:
            raise RuntimeError("GnwsHandler.handle called before initialize")
        return self.predictor

    def _prepare(self, row: Mapping[str, Any]) -> _Item:
        predictor = self._loaded()
        start = time.perf_counter()
        item = _Item()
        try:
            params = RequestParams.from_fields(row)
            if params.model and params.model != predictor.name:
                raise UnknownModelError(
                    f"model {params.model!r}: this TorchServe model is {predictor.name!r}; TorchServe picks the "
                    f"model from the URL (POST /predictions/{params.model}), not from ?model="
                )
            role: Role = "segment" if predictor.has_masks else "detect"
            item.request = DetectionRequest.bind(predictor, params, role)
            rgb = predictor.decode(request_image(row))
            item.prepared = predictor.prepare_decoded(rgb)
            if params.format != "json":
                item.rgb = rgb
        except GnwsError as exc:
            item.failure = exc
        item.prepare_ms = (time.perf_counter() - start) * 1e3
        return item

    def inference(self, prepared: Sequence[PreparedImage]) -> list[RawDetections]:
        """One predictor call for the whole batch (grouped by padded shape inside)."""
        with torch.inference_mode():
            return self._loaded().infer(prepared)

    def _answer(self, item: _Item, raw: RawDetections, inference_ms: float, batch_size: int) -> str | bytes:
        """The service's document for a one-image request, or the drawn image."""
        request, prepared = item.request, item.prepared
        if request is None or prepared is None:  # pragma: no cover - only prepared items are answered
            raise RuntimeError("answering a request that failed")
        start = time.perf_counter()
        detections = request.encode(raw)
        if request.params.format != "json":
            if item.rgb is None:  # pragma: no cover - _prepare keeps it for format=png|jpeg
                raise RuntimeError("the decoded image was not kept")
            return request.draw(item.rgb, detections)
        # TorchServe queues requests before the handler: its queue time is in its own metrics.
        timings = Timings(prepare_ms=item.prepare_ms, queue_ms=0.0, inference_ms=inference_ms,
                          encode_ms=(time.perf_counter() - start) * 1e3)
        image = image_entry(index=0, filename=None, ori_shape=prepared.ori_shape, batch_size=batch_size,
                            timings=timings, detections=detections)
        return json.dumps(response_document(model_summary(request.predictor.name, request.predictor), [image]))

    def handle(self, data: Sequence[Mapping[str, Any]], context: Any) -> list[str | bytes]:
        """Answer a TorchServe batch: one body per request, in request order."""
        items = [self._prepare(row) for row in data]
        ok = [i for i, item in enumerate(items) if item.failure is None]
        logger.info("batch of %d requests (%d images)", len(items), len(ok))
        responses: list[str | bytes] = [""] * len(items)
        if ok:
            prepared = [items[i].prepared for i in ok]
            start = time.perf_counter()
            raw = self.inference(prepared)  # type: ignore[arg-type]  # ok items are prepared
            inference_ms = (time.perf_counter() - start) * 1e3
            forward_sizes = Counter(p.pad_shape for p in prepared if p is not None)  # images per forward pass
            for i, r in zip(ok, raw, strict=True):
                pad_shape = items[i].prepared.pad_shape  # type: ignore[union-attr]
                responses[i] = self._answer(items[i], r, inference_ms, forward_sizes[pad_shape])
        for i, item in enumerate(items):
            if item.failure is not None:
                responses[i] = json.dumps(error_document(item.failure))
                context.set_response_status(status_for(item.failure), message_of(item.failure), i)
                context.set_response_content_type(i, JSON)
            else:
                request = item.request
                context.set_response_content_type(i, MEDIA_TYPES[request.params.format] if request else JSON)
        return responses
