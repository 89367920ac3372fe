"""The response document: the JSON every transport answers a detection request with.

``{"model": {...}, "images": [{"index", "filename", "width", "height", "batch_size", "timings",
"detections"}]}``, with ``None`` fields left out; errors are ``{"detail": message}``. The service's
OpenAPI schema (``service.schemas``) describes exactly this document.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from models import GnwsError, Predictor

from .detections import Timings
from .errors import message_of


def without_none(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` minus the ``None`` values (the documents leave them out)."""
    return {key: value for key, value in fields.items() if value is not None}


def public_provenance(value: Any) -> Any:
    """``value`` with every absolute file path reduced to its file name: documents go to clients,
    who get names and digests, never the server's paths (the file's own metadata keeps them)."""
    if isinstance(value, Mapping):
        return {key: public_provenance(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [public_provenance(v) for v in value]
    if isinstance(value, str) and value.startswith(("/", "~/")):
        return PurePosixPath(value).name or value
    if isinstance(value, str) and PureWindowsPath(value).drive:
        return PureWindowsPath(value).name or value
    return value


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/'\"]+/)+([^\s/'\"]*)")


def public_text(message: str) -> str:
    """``message`` with absolute file paths reduced to their last part (``/srv/store/x.pth`` → ``x.pth``).

    A path counts as a file path when its first folder exists on this machine (``/srv``, ``/tmp``,
    ``/home``, ...), so URL paths in messages (``POST /predictions/NAME``, ``/v1/models``) stay.
    """

    def shorten(match: re.Match[str]) -> str:
        top = match.group(0).split("/")[1]
        return (match.group(1) or "/") if top and os.path.isdir(f"/{top}") else match.group(0)

    return _ABSOLUTE_PATH.sub(shorten, message)


def model_summary(
    name: str, predictor: Predictor, *, generation: int = 0, version: int | None = None
) -> dict[str, Any]:
    """Which model answered and where its weights came from.

    Args:
        name: the served name.
        generation: 0 for the first load, +1 per reload.
        version: the model-store version of the weights, for versioned models.
    """
    info = predictor.info
    return without_none({
        "name": name, "arch": info.config.arch, "zoo_key": info.zoo_key, "source_sha256": info.source_sha256,
        "version": version, "generation": generation, "precision": getattr(predictor, "precision", "fp32"),
        "provenance": public_provenance(info.provenance),
    })  # fmt: skip


def image_entry(
    *,
    index: int,
    filename: str | None,
    ori_shape: tuple[int, int],
    batch_size: int,
    timings: Timings,
    detections: Sequence[Mapping[str, Any]],
    worker: str | None = None,
) -> dict[str, Any]:
    """One image's part of the document (``ori_shape`` is ``(height, width)`` after EXIF orientation;
    ``worker``: the remote replica that ran its forward pass, when there is one)."""
    height, width = ori_shape
    return without_none({
        "index": index, "filename": filename, "width": width, "height": height, "batch_size": batch_size,
        "worker": worker, "timings": timings.as_dict(), "detections": list(detections),
    })  # fmt: skip


def response_document(model: Mapping[str, Any], images: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {"model": dict(model), "images": list(images)}


def error_document(exc: GnwsError | str, *, key: str = "detail") -> dict[str, str]:
    """``{"detail": message}``: every error body of the ``/v1`` API and the TorchServe handler
    (``key="error"``: the Open Inference Protocol's shape). Server paths are reduced to file names."""
    return {key: public_text(exc if isinstance(exc, str) else message_of(exc))}
