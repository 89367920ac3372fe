"""TorchServe handler serving a gnws detector with the same JSON as the HTTP service.

Built on :class:`models.Predictor` (the handler imports ``models`` only, see ``shared/STYLE.md``)
and shaped like LitServe's loop: decode → batch → infer → unbatch → encode, weights touched only
in :meth:`GnwsHandler.initialize`. Each response is the service's ``/v1/detect`` (or, for a Mask
R-CNN, ``/v1/segment``) JSON for a one-image request; errors are ``{"detail": message}``.
A TorchServe batch is one list of requests; images that fail to decode get their own 4xx response
(``context.set_response_status(..., idx)``) while the rest of the batch is answered normally.
Batching never changes results: the predictor groups images by padded shape (GroupNorm statistics include the padding).

Settings come from the ``handler:`` section of the archive's ``model-config.yaml`` (written by
``gnws archive``): ``device`` (``auto`` = the GPU TorchServe assigned to this worker, else CPU),
``image_scale`` (``[max_size, min_size]``, tests and smoke runs only) and ``max_pixels``.

TorchServe loads this file as a module and requires exactly one class defined in it: keep helpers
as functions.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from models import GnwsError, ImageDecodeError, ImageTooLargeError, Predictor, PreparedImage, RawDetections
from models.preprocess import DEFAULT_MAX_PIXELS

logger = logging.getLogger(__name__)

# Request fields TorchServe may carry the image in: raw body ("body"/"data") or a multipart field.
IMAGE_FIELDS = ("data", "body", "file", "image")
JSON = "application/json"
# A request that failed before inference: (HTTP status, error).
Failure = tuple[int, Exception]


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


def error_body(exc: Exception) -> str:
    """The JSON error body, as the HTTP service's ``ErrorResponse``: ``{"detail": message}``."""
    return json.dumps({"detail": str(exc)})


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
        self.predictor = Predictor.load(
            path,
            device=device,
            model_name=str(settings.get("model_name") or context.model_name),
            max_pixels=int(settings.get("max_pixels", DEFAULT_MAX_PIXELS)),
            image_scale=parse_image_scale(settings.get("image_scale")),
        )
        self.initialized = True
        logger.info("loaded %s from %s on %s (batch size %s)", self.predictor.name, path, device,
                    props.get("batch_size"))

    def _loaded(self) -> Predictor:
        if self.predictor is None:
            raise RuntimeError("GnwsHandler.handle called before initialize")
        return self.predictor

    def preprocess(self, data: Sequence[Mapping[str, Any]]) -> list[tuple[PreparedImage | Failure, float]]:
        """Decode and prepare every request: ``(prepared image or (status, error), milliseconds)``."""
        predictor = self._loaded()
        out: list[tuple[PreparedImage | Failure, float]] = []
        for row in data:
            start = time.perf_counter()
            item: PreparedImage | Failure
            try:
                item = predictor.prepare(request_image(row))
            except ImageTooLargeError as exc:
                item = (413, exc)
            except ImageDecodeError as exc:
                item = (400, exc)
            out.append((item, (time.perf_counter() - start) * 1e3))
        return out

    def inference(self, prepared: Sequence[PreparedImage]) -> list[RawDetections]:
        """One predictor call for the whole batch (grouped by padded shape inside)."""
        with torch.inference_mode():
            return self._loaded().infer(prepared)

    def postprocess(self, prepared: Sequence[PreparedImage], raw: Sequence[RawDetections],
                    prepare_ms: Sequence[float], inference_ms: float) -> list[str]:
        """One JSON body per image, shaped like the service's ``DetectResponse`` for a one-image request."""
        predictor = self._loaded()
        info = predictor.info
        model = {"name": predictor.name, "arch": info.config.arch, "zoo_key": info.zoo_key,
                 "source_sha256": info.source_sha256, "generation": 0, "provenance": info.provenance}
        forward_sizes = Counter(p.pad_shape for p in prepared)  # images sharing each forward pass
        bodies = []
        for p, r, p_ms in zip(prepared, raw, prepare_ms, strict=True):
            start = time.perf_counter()
            detections = predictor.encode(r)
            image = {
                "index": 0, "filename": None, "width": p.ori_shape[1], "height": p.ori_shape[0],
                "batch_size": forward_sizes[p.pad_shape],
                # TorchServe queues requests before the handler: its queue time is in its own metrics.
                "timings": {"prepare_ms": p_ms, "queue_ms": 0.0, "inference_ms": inference_ms,
                            "encode_ms": (time.perf_counter() - start) * 1e3},
                "detections": detections,
            }
            bodies.append(json.dumps({"model": model, "images": [image]}))
        return bodies

    def handle(self, data: Sequence[Mapping[str, Any]], context: Any) -> list[str]:
        """Answer a TorchServe batch: one JSON string per request, in request order."""
        items = self.preprocess(data)
        ok = [i for i, (item, _) in enumerate(items) if isinstance(item, PreparedImage)]
        prepared = [cast(PreparedImage, items[i][0]) for i in ok]
        logger.info("batch of %d requests (%d images)", len(items), len(ok))
        responses: list[str] = [""] * len(items)
        if ok:
            start = time.perf_counter()
            raw = self.inference(prepared)
            inference_ms = (time.perf_counter() - start) * 1e3
            bodies = self.postprocess(prepared, raw, [items[i][1] for i in ok], inference_ms)
            for i, body in zip(ok, bodies, strict=True):
                responses[i] = body
        for i, (item, _) in enumerate(items):
            if not isinstance(item, PreparedImage):
                status, exc = item
                responses[i] = error_body(exc)
                context.set_response_status(status, str(exc), i)
            context.set_response_content_type(i, JSON)
        return responses
