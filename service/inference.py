"""One inference request from bytes to detections: check → receive → admit → prepare → batch → encode.

Shared by every HTTP transport of the app (``/v1`` JSON, ``/v2`` Open Inference Protocol). A
route calls, in order:

1. :meth:`InferencePipeline.check`: the model, the parameters against it, and room in its queue,
   before a byte of the body is read (404/422/429/503 cost the client nothing to send);
2. :meth:`InferencePipeline.receive`: reads the body in one of ``max_uploads`` upload places,
   under the upload limits (size, stalls, trickles; :mod:`service.uploads`);
3. :meth:`InferencePipeline.run`: takes one of ``max_in_flight`` processing places, decodes,
   queues for a forward pass and encodes; the route turns the :class:`Outcome` into its response.

Upload places and processing places are separate, so clients that send slowly (or not at all)
cannot take the places of requests whose images have arrived. Parameters, selection and encoding
are the request layer's (:mod:`gnws.request`). CPU work (decoding, resizing, RLE encoding,
drawing) runs in a small thread pool and forward passes in the batcher's thread, so the event loop
only moves bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from gnws.request import DetectionRequest, RequestParams, Role, Timings, image_entry, model_summary, response_document
from gnws.request.errors import InvalidParameterError, OverloadedError, UploadTimeoutError
from models import PreparedImage

from .metrics import Metrics
from .registry import ModelRegistry, ServedModel
from .settings import Settings
from .uploads import Upload

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class ImageOutcome:
    """One image's answer: its detections (COCO format) and where its time went."""

    filename: str | None
    ori_shape: tuple[int, int]
    batch_size: int
    timings: Timings
    detections: list[dict[str, Any]]
    rgb: np.ndarray | None  # the decoded image, kept only to draw on (format=png|jpeg)
    worker: str | None = None  # the remote replica that ran the forward pass, if any


@dataclass(frozen=True)
class Outcome:
    """A whole request's answer."""

    served: ServedModel
    request: DetectionRequest
    images: list[ImageOutcome]

    def document(self) -> dict[str, Any]:
        """The response document (:mod:`gnws.request.document`)."""
        model = model_summary(self.served.name, self.request.predictor, generation=self.served.generation,
                              version=self.served.version)
        return response_document(model, [
            image_entry(index=i, filename=img.filename, ori_shape=img.ori_shape, batch_size=img.batch_size,
                        timings=img.timings, detections=img.detections, worker=img.worker)
            for i, img in enumerate(self.images)
        ])  # fmt: skip


class Places:
    """A bounded number of places (request bodies being received, requests being processed): taking
    one when all are taken is refused with :class:`~gnws.request.errors.OverloadedError` (429).

    Args:
        limit: how many places.
        busy: what the holders are doing, for the refusal ("uploads are already being received").
        gauge: metric of the places taken.
        refused: counter of refusals.
    """

    def __init__(self, limit: int, busy: str, gauge: Any, refused: Any) -> None:
        self.limit = limit
        self.busy = busy
        self.taken = 0
        self._gauge = gauge
        self._refused = refused

    @contextmanager
    def take(self) -> Iterator[None]:
        if self.taken >= self.limit:
            self._refused.inc()
            raise OverloadedError(f"{self.taken} {self.busy} (limit {self.limit}); retry after Retry-After seconds")
        self.taken += 1
        self._gauge.inc()
        try:
            yield
        finally:
            self.taken -= 1
            self._gauge.dec()


@dataclass
class _Prepared:
    filename: str | None  # the upload's bytes are not kept once decoded
    prepared: PreparedImage
    rgb: np.ndarray | None
    prepare_s: float


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
        self._processing = Places(settings.max_in_flight, "requests are already being handled", metrics.in_flight,
                                  metrics.rejected.labels("in_flight"))
        self._uploads = Places(settings.max_uploads, "uploads are already being received", metrics.uploads,
                               metrics.rejected.labels("uploads"))

    def check(self, role: Role | None, params: RequestParams) -> tuple[ServedModel, DetectionRequest]:
        """The model that will answer and the parameters bound to it, refused before the body is read.

        Args:
            role: ``detect`` or ``segment`` (the default model, and whether masks are returned);
                ``None`` for the model's own: ``segment`` for a Mask R-CNN.
        """
        served = self.registry.get(params.model, role or "detect")
        role = role or ("segment" if served.predictor.has_masks else "detect")
        request = DetectionRequest.bind(served.predictor, params, role, name=served.name)
        batcher = self.registry.batcher(served.name)
        if not batcher.has_room():
            raise batcher.overloaded()
        return served, request

    async def receive(self, read: Callable[[], Awaitable[T]]) -> T:
        """Read a request's body in one of ``max_uploads`` upload places, within the request timeout."""
        try:
            with self._uploads.take():
                async with asyncio.timeout(self.settings.request_timeout_s):
                    return await read()
        except TimeoutError:
            self.metrics.rejected.labels("timeout").inc()
            raise UploadTimeoutError(
                f"the upload was not received within the {self.settings.request_timeout_s:g} s request timeout; "
                "send the image faster or a smaller one"
            ) from None
        except UploadTimeoutError:
            self.metrics.rejected.labels("timeout").inc()
            raise

    async def run(self, served: ServedModel, request: DetectionRequest, uploads: Sequence[Upload]) -> Outcome:
        """Answer a checked request: every image's detections, filtered and encoded as asked.

        Raises:
            GnwsError: every refusal, with its status in :mod:`gnws.request.errors`.
        """
        fmt = request.params.format
        if fmt != "json" and len(uploads) != 1:
            raise InvalidParameterError(f"format={fmt} draws one image; this request has {len(uploads)}")
        deadline = time.perf_counter() + self.settings.request_timeout_s
        batcher = self.registry.batcher(served.name)
        with self._processing.take():
            loop = asyncio.get_running_loop()
            prepared = [await loop.run_in_executor(self._cpu, self._prepare, request, upload, fmt != "json")
                        for upload in uploads]
            for p in prepared:
                self.metrics.stage_latency.labels(served.name, "prepare").observe(p.prepare_s)
            results = await batcher.run(request.predictor, [p.prepared for p in prepared],
                                        timeout_s=max(deadline - time.perf_counter(), 0.001))
            images: list[ImageOutcome] = []
            for p, result in zip(prepared, results, strict=True):
                t0 = time.perf_counter()
                detections = await loop.run_in_executor(self._cpu, request.encode, result.raw)
                encode_s = time.perf_counter() - t0
                self.metrics.stage_latency.labels(served.name, "encode").observe(encode_s)
                timings = Timings(prepare_ms=p.prepare_s * 1e3, queue_ms=result.queue_s * 1e3,
                                  inference_ms=result.inference_s * 1e3, encode_ms=encode_s * 1e3)
                images.append(ImageOutcome(filename=p.filename, ori_shape=p.prepared.ori_shape,
                                           batch_size=result.batch_size, timings=timings, detections=detections,
                                           rgb=p.rgb, worker=result.raw.worker))
            return Outcome(served=served, request=request, images=images)

    async def draw(self, outcome: Outcome) -> bytes:
        """The request's one image with its detections drawn, as PNG or JPEG bytes."""
        image = outcome.images[0]
        if image.rgb is None:  # pragma: no cover - run keeps it for format=png|jpeg
            raise RuntimeError("the decoded image was not kept")
        return await asyncio.get_running_loop().run_in_executor(
            self._cpu, outcome.request.draw, image.rgb, image.detections
        )

    @staticmethod
    def _prepare(request: DetectionRequest, upload: Upload, keep_rgb: bool) -> _Prepared:
        start = time.perf_counter()
        rgb = request.predictor.decode(upload.data)
        prepared = request.predictor.prepare_decoded(rgb)
        return _Prepared(filename=upload.filename, prepared=prepared, rgb=rgb if keep_rgb else None,
                         prepare_s=time.perf_counter() - start)
