"""TorchServe handler serving a gnws detector with the same JSON as the HTTP service.

Built on :class:`models.Predictor` (the handler imports ``models`` only, see ``shared/STYLE.md``)
and shaped like LitServe's loop: decode → batch → infer → unbatch → encode, weights touched only
in :meth:`GnwsHandler.initialize`. Each response is what the service's ``/v1/detect`` (or, for a Mask
R-CNN, ``/v1/segment``) answers for a one-image request, field for field: ``None`` fields left out
(the service's ``response_model_exclude_none``), the model's provenance from the baked file's
metadata, ``generation`` 0 (the service counts hot reloads; TorchServe here has none, the model API
is off). Errors are ``{"detail": message}`` with the service's statuses (400 bad image, 413 too
many pixels, 422 bad parameter, 404 another model).

Query parameters as in the service: ``score_threshold`` (0-1), ``max_detections`` (0-1000),
``classes`` (names or COCO ids, comma-separated), ``polygons`` (masks only), ``format``
(``json``, or ``png``/``jpeg`` for the image with detections drawn) and ``model`` (must be this
model: TorchServe picks the model from the URL). TorchServe 0.12 hands a handler the query string
only on ``POST /models/NAME/invoke`` (and the legacy ``/NAME/predict``); ``POST /predictions/NAME``
drops it (``InferenceRequestHandler.handlePredictions`` parses no query). There, send the same
names as multipart form fields next to the image (``-F file=@x.jpg -F score_threshold=0.3``).
Either way they arrive as fields of the request row, as UTF-8 bytes; a repeated name arrives once
(the last value), so give several classes as ``classes=person,car``. The filtering is the service's
own (:mod:`models.selection`); tests compare the two services' whole responses.

A TorchServe batch is one list of requests; a request that fails before inference gets its own
4xx response (``context.set_response_status(..., idx)``) while the rest of the batch is answered
normally. Batching never changes results: the predictor groups images by padded shape (GroupNorm
statistics include the padding).

Settings come from the ``handler:`` section of the archive's ``model-config.yaml`` (written by
``gnws archive``): ``device`` (``auto`` = the GPU TorchServe assigned to this worker, else CPU),
``image_scale`` (``[max_size, min_size]``, tests and smoke runs only) and ``max_pixels``.

TorchServe loads this file as a module and requires exactly one class defined in it: keep helpers
as functions.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from models import GnwsError, ImageDecodeError, ImageTooLargeError, Predictor, PreparedImage, RawDetections, selection
from models.allocator import tune_malloc
from models.draw import draw_detections
from models.errors import UnknownClassError
from models.preprocess import DEFAULT_MAX_PIXELS, decode_image

logger = logging.getLogger(__name__)

# Request fields TorchServe may carry the image in: raw body ("body"/"data") or a multipart field.
IMAGE_FIELDS = ("data", "body", "file", "image")
JSON = "application/json"
MEDIA_TYPES = {"json": JSON, "png": "image/png", "jpeg": "image/jpeg"}
TRUE_WORDS = frozenset({"1", "true", "on", "yes"})
FALSE_WORDS = frozenset({"0", "false", "off", "no"})
MAX_DETECTIONS_LIMIT = 1000
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


def param_text(row: Mapping[str, Any], name: str) -> str | None:
    """A query parameter of the request row as text (TorchServe passes it as UTF-8 bytes)."""
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"{name}: not UTF-8 text") from None
    return str(value).strip()


def parse_number(row: Mapping[str, Any], name: str, kind: type, low: float, high: float) -> Any:
    """``kind(text)`` within ``[low, high]``, or ``None`` when absent.

    Raises:
        ValueError: not a number of that kind, or out of range (the service answers 422).
    """
    text = param_text(row, name)
    if text is None or text == "":
        return None
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{name}: expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if not low <= value <= high:  # NaN fails too
        raise ValueError(f"{name}: must be between {low:g} and {high:g}, got {text}")
    return value


def class_indices(predictor: Predictor, text: str | None) -> list[int] | None:
    """Label indices for comma-separated class names (any case) or COCO category ids; ``None`` for all.

    Raises:
        ValueError: a token is neither a class name nor a category id of the model (422).
    """
    try:
        return selection.class_indices(predictor.classes, predictor.category_ids, [text or ""],
                                       model_name=predictor.name)
    except UnknownClassError as exc:
        raise ValueError(
            f"{exc} The model's classes are its training classes (COCO's 80 for the zoo models)."
        ) from None


def request_params(row: Mapping[str, Any], predictor: Predictor) -> dict[str, Any]:
    """The query parameters of one request, checked like the service checks them.

    Raises:
        ValueError: a bad value (422).
        LookupError: ``model`` names another model (404).
    """
    model = param_text(row, "model")
    if model and model != predictor.name:
        raise LookupError(
            f"model {model!r}: this TorchServe model is {predictor.name!r}; TorchServe picks the model from "
            f"the URL (POST /predictions/{model}), not from ?model="
        )
    fmt = (param_text(row, "format") or "json").lower()
    if fmt not in MEDIA_TYPES:
        raise ValueError(f"format: expected one of {', '.join(MEDIA_TYPES)}, got {fmt!r}")
    polygons = (param_text(row, "polygons") or "false").lower()
    if polygons not in TRUE_WORDS | FALSE_WORDS:
        raise ValueError(f"polygons: expected true or false, got {polygons!r}")
    return {
        "score_threshold": parse_number(row, "score_threshold", float, 0.0, 1.0),
        "max_detections": parse_number(row, "max_detections", int, 0, MAX_DETECTIONS_LIMIT),
        "labels": class_indices(predictor, param_text(row, "classes")),
        "format": fmt,
        "polygons": polygons in TRUE_WORDS,
    }


def without_none(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` minus the ``None`` values (the service leaves them out of its JSON)."""
    return {key: value for key, value in fields.items() if value is not None}


def model_summary(predictor: Predictor) -> dict[str, Any]:
    """The service's ``ModelSummary``: name, arch, and provenance from the baked file's metadata."""
    info = predictor.info
    return without_none({"name": predictor.name, "arch": info.config.arch, "zoo_key": info.zoo_key,
                         "source_sha256": info.source_sha256, "generation": 0, "provenance": info.provenance})


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
        self.model: dict[str, Any] = {}
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
        )
        self.model = model_summary(self.predictor)
        self.initialized = True
        logger.info("loaded %s from %s on %s (batch size %s)", self.predictor.name, path, device,
                    props.get("batch_size"))

    def _loaded(self) -> Predictor:
        if self.predictor is None:
            raise RuntimeError("GnwsHandler.handle called before initialize")
        return self.predictor

    def preprocess(self, data: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Check the parameters, decode and prepare every request.

        One dict per request: ``prepared`` (or ``failure``: ``(status, error)``), ``params``,
        ``rgb`` (the decoded image, kept to draw on for ``format=png|jpeg``) and ``prepare_ms``.
        """
        predictor = self._loaded()
        out: list[dict[str, Any]] = []
        for row in data:
            start = time.perf_counter()
            item: dict[str, Any] = {"prepared": None, "failure": None, "params": None, "rgb": None}
            try:
                item["params"] = request_params(row, predictor)
                rgb = decode_image(request_image(row), max_pixels=predictor.max_pixels)
                item["prepared"] = predictor.prepare(rgb)
                if item["params"]["format"] != "json":
                    item["rgb"] = rgb
            except ImageTooLargeError as exc:
                item["failure"] = (413, exc)
            except ImageDecodeError as exc:
                item["failure"] = (400, exc)
            except LookupError as exc:
                item["failure"] = (404, exc)
            except ValueError as exc:
                item["failure"] = (422, exc)
            item["prepare_ms"] = (time.perf_counter() - start) * 1e3
            out.append(item)
        return out

    def inference(self, prepared: Sequence[PreparedImage]) -> list[RawDetections]:
        """One predictor call for the whole batch (grouped by padded shape inside)."""
        with torch.inference_mode():
            return self._loaded().infer(prepared)

    def encode(self, raw: RawDetections, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The service's detections: filtered, COCO-encoded, masks only from a Mask R-CNN, polygons on request."""
        predictor = self._loaded()
        chosen = selection.select_detections(raw, score_threshold=params["score_threshold"], labels=params["labels"],
                                             max_detections=params["max_detections"], keep_masks=predictor.has_masks)
        detections: list[dict[str, Any]] = [dict(d) for d in predictor.encode(chosen)]
        if params["polygons"] and chosen.masks is not None:
            for det, mask in zip(detections, chosen.masks, strict=True):
                det["polygons"] = selection.mask_polygons(mask)
        return detections

    def postprocess(self, items: Sequence[Mapping[str, Any]], raw: Sequence[RawDetections],
                    inference_ms: float) -> list[str | bytes]:
        """One body per image: the service's ``DetectResponse`` JSON for a one-image request, or the drawn image."""
        forward_sizes = Counter(item["prepared"].pad_shape for item in items)  # images sharing each forward pass
        bodies: list[str | bytes] = []
        for item, r in zip(items, raw, strict=True):
            p: PreparedImage = item["prepared"]
            start = time.perf_counter()
            detections = self.encode(r, item["params"])
            fmt = item["params"]["format"]
            if fmt != "json":
                buffer = io.BytesIO()
                draw_detections(item["rgb"], detections).save(buffer, format=fmt.upper(), quality=90)
                bodies.append(buffer.getvalue())
                continue
            image = {
                "index": 0, "width": p.ori_shape[1], "height": p.ori_shape[0],
                "batch_size": forward_sizes[p.pad_shape],
                # TorchServe queues requests before the handler: its queue time is in its own metrics.
                "timings": {"prepare_ms": item["prepare_ms"], "queue_ms": 0.0, "inference_ms": inference_ms,
                            "encode_ms": (time.perf_counter() - start) * 1e3},
                "detections": detections,
            }
            bodies.append(json.dumps({"model": self.model, "images": [image]}))
        return bodies

    def handle(self, data: Sequence[Mapping[str, Any]], context: Any) -> list[str | bytes]:
        """Answer a TorchServe batch: one body per request, in request order."""
        items = self.preprocess(data)
        ok = [i for i, item in enumerate(items) if item["failure"] is None]
        logger.info("batch of %d requests (%d images)", len(items), len(ok))
        responses: list[str | bytes] = [""] * len(items)
        if ok:
            start = time.perf_counter()
            raw = self.inference([items[i]["prepared"] for i in ok])
            inference_ms = (time.perf_counter() - start) * 1e3
            bodies = self.postprocess([items[i] for i in ok], raw, inference_ms)
            for i, body in zip(ok, bodies, strict=True):
                responses[i] = body
        for i, item in enumerate(items):
            media_type = JSON
            if item["failure"] is not None:
                status, exc = item["failure"]
                responses[i] = error_body(exc)
                context.set_response_status(status, str(exc), i)
            else:
                media_type = MEDIA_TYPES[item["params"]["format"]]
            context.set_response_content_type(i, media_type)
        return responses
