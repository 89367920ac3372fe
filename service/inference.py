"""One inference request from bytes to response: admit → read → prepare → batch → select → encode.

CPU work (decoding, resizing, RLE encoding, drawing) runs in a small thread pool and forward
passes in the batcher's thread, so the event loop only moves bytes. Admission control bounds
memory: at most ``max_in_flight`` requests are being read or processed, and a request is refused
before its body is read when its model's queue is already full.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from models import Predictor, PreparedImage, RawDetections, selection
from models.draw import draw_detections
from models.errors import UnknownClassError
from models.preprocess import decode_image

from .errors import InvalidParameterError, OverloadedError, UploadTimeoutError
from .metrics import Metrics
from .registry import ModelRegistry, Role, ServedModel
from .schemas import DetectResponse, ImageResult, ModelSummary, Timings
from .settings import Settings
from .uploads import Upload, read_uploads

logger = logging.getLogger(__name__)

ImageFormat = Literal["json", "png", "jpeg"]
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}


@dataclass(frozen=True)
class InferenceParams:
    """Query parameters of ``/v1/detect`` and ``/v1/segment`` (already range-checked by FastAPI)."""

    model: str | None = None
    score_threshold: float | None = None
    max_detections: int | None = None
    classes: tuple[str, ...] = ()
    format: ImageFormat = "json"
    polygons: bool = False


@dataclass
class _Prepared:
    filename: str | None  # the upload's bytes are not kept once decoded
    prepared: PreparedImage
    rgb: np.ndarray | None
    prepare_s: float


def class_indices(predictor: Predictor, wanted: Sequence[str]) -> list[int] | None:
    """Label indices for ``classes`` given as names (any case) or COCO category ids; ``None`` for all."""
    try:
        return selection.class_indices(predictor.classes, predictor.category_ids, wanted, model_name=predictor.name)
    except UnknownClassError as exc:
        raise InvalidParameterError(f"{exc} GET /v1/models lists them.") from None


class InferencePipeline:
    """Runs detect/segment requests through the registry's batchers.

    Args:
        settings: service settings.
        registry: loaded models and their batchers.
        metrics: the app's metrics.
        cpu_executor: thread pool for decoding, encoding and drawing.
    """

    def __init__(self, settings: Settings, registry: ModelRegistry, metrics: Metrics, cpu_executor: Executor) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self._cpu = cpu_executor
        self._in_flight = 0

    @contextmanager
    def _admit(self) -> Iterator[None]:
        if self._in_flight >= self.settings.max_in_flight:
            self.metrics.rejected.labels("in_flight").inc()
            raise OverloadedError(
                f"{self._in_flight} requests are already being handled (limit {self.settings.max_in_flight}); "
                "retry after Retry-After seconds"
            )
        self._in_flight += 1
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self._in_flight -= 1
            self.metrics.in_flight.dec()

    async def handle(self, request: Request, role: Role, params: InferenceParams) -> DetectResponse | Response:
        """Answer one request: JSON detections, or the annotated image for ``format=png|jpeg``."""
        deadline = time.perf_counter() + self.settings.request_timeout_s
        served = self.registry.get(params.model, role)
        predictor = served.predictor
        if role == "segment" and not predictor.has_masks:
            raise InvalidParameterError(f"model {served.name} has no mask head; /v1/segment needs a Mask R-CNN model")
        labels = class_indices(predictor, params.classes)
        batcher = self.registry.batcher(served.name)
        with self._admit():
            if not batcher.has_room():
                raise batcher.overloaded()
            prepared = await self._read_and_prepare(request, predictor, params, deadline)
            loop = asyncio.get_running_loop()
            for p in prepared:
                self.metrics.stage_latency.labels(served.name, "prepare").observe(p.prepare_s)
            results = await batcher.run(predictor, [p.prepared for p in prepared],
                                        timeout_s=max(deadline - time.perf_counter(), 0.001))
            # Jobs keep the predictor they were prepared for, so a reload in between changes nothing here.
            used = results[0].predictor
            model = self._summary(served, used)
            images: list[ImageResult] = []
            for i, (p, result) in enumerate(zip(prepared, results, strict=True)):
                t0 = time.perf_counter()
                detections = await loop.run_in_executor(
                    self._cpu, self._encode, used, result.raw, labels, params, role
                )
                encode_s = time.perf_counter() - t0
                self.metrics.stage_latency.labels(served.name, "encode").observe(encode_s)
                h, w = p.prepared.ori_shape
                images.append(ImageResult(
                    index=i, filename=p.filename, width=w, height=h, batch_size=result.batch_size,
                    timings=Timings(prepare_ms=p.prepare_s * 1e3, queue_ms=result.queue_s * 1e3,
                                    inference_ms=result.inference_s * 1e3, encode_ms=encode_s * 1e3),
                    detections=detections,  # type: ignore[arg-type]  # validated by the response model
                ))
            if params.format != "json":
                rgb = prepared[0].rgb
                if rgb is None:  # pragma: no cover - keep_rgb guarantees it
                    raise RuntimeError("decoded image was not kept")
                data = await loop.run_in_executor(self._cpu, self._draw, rgb, images[0].detections, params.format)
                return Response(content=data, media_type=MEDIA_TYPES[params.format])
            return DetectResponse(model=model, images=images)

    async def _read_and_prepare(
        self, request: Request, predictor: Predictor, params: InferenceParams, deadline: float
    ) -> list[_Prepared]:
        """Read the body and prepare its images, within the request's time limit (a client that
        drip-feeds its upload cannot hold an in-flight place for longer)."""
        loop = asyncio.get_running_loop()
        keep_rgb = params.format != "json"
        try:
            async with asyncio.timeout(max(deadline - time.perf_counter(), 0.001)):
                uploads = await read_uploads(request, max_bytes=self.settings.max_upload_bytes,
                                             max_files=self.settings.max_files)
                if params.format != "json" and len(uploads) != 1:
                    raise InvalidParameterError(
                        f"format={params.format} draws one image; this request has {len(uploads)}"
                    )
                return [await loop.run_in_executor(self._cpu, self._prepare, predictor, upload, keep_rgb)
                        for upload in uploads]
        except TimeoutError:
            self.metrics.rejected.labels("timeout").inc()
            raise UploadTimeoutError(
                f"the upload was not received and decoded within the {self.settings.request_timeout_s:g} s "
                "request timeout; send the image faster or a smaller one"
            ) from None

    def _prepare(self, predictor: Predictor, upload: Upload, keep_rgb: bool) -> _Prepared:
        start = time.perf_counter()
        rgb = decode_image(upload.data, max_pixels=self.settings.max_pixels)
        prepared = predictor.prepare(rgb)
        return _Prepared(filename=upload.filename, prepared=prepared, rgb=rgb if keep_rgb else None,
                         prepare_s=time.perf_counter() - start)

    @staticmethod
    def _encode(
        predictor: Predictor, raw: RawDetections, labels: list[int] | None, params: InferenceParams, role: Role
    ) -> list[dict[str, Any]]:
        chosen = selection.select_detections(raw, score_threshold=params.score_threshold, labels=labels,
                                             max_detections=params.max_detections, keep_masks=role == "segment")
        detections: list[dict[str, Any]] = [dict(d) for d in predictor.encode(chosen)]
        if params.polygons and chosen.masks is not None:
            for det, mask in zip(detections, chosen.masks, strict=True):
                det["polygons"] = selection.mask_polygons(mask)
        return detections

    @staticmethod
    def _draw(rgb: np.ndarray, detections: Sequence[Any], fmt: ImageFormat) -> bytes:
        dets = [d.model_dump(exclude_none=True) if hasattr(d, "model_dump") else d for d in detections]
        image = draw_detections(rgb, dets)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG" if fmt == "png" else "JPEG", quality=90)
        return buffer.getvalue()

    @staticmethod
    def _summary(served: ServedModel, predictor: Predictor) -> ModelSummary:
        info = predictor.info
        return ModelSummary(name=served.name, arch=info.config.arch, zoo_key=info.zoo_key,
                            source_sha256=info.source_sha256, generation=served.generation, provenance=info.provenance)
