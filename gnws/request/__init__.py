"""The transport-neutral request layer: one detection request, whatever carried it.

Every transport (the FastAPI ``/v1`` routes, the Open Inference Protocol ``/v2`` routes, the
TorchServe handler, the Ray Serve deployment) is a thin adapter over this package: it moves bytes,
parameters and statuses, and never re-implements a limit, an encoding or a status. What is here:

- :mod:`.params`: the request parameters and their limits, defined once (:class:`RequestParams`);
- :mod:`.detections`: class selection, score/count filtering, COCO/RLE/polygon encoding, drawing
  (:class:`DetectionRequest`);
- :mod:`.document`: the response document (the JSON every transport answers with);
- :mod:`.errors`: the domain errors of serving and the one error → status table.

Imports :mod:`models` only (checked by import-linter).
"""

from .detections import DetectionRequest, Timings
from .document import error_document, image_entry, model_summary, response_document
from .errors import (
    STATUS_BY_ERROR,
    InvalidParameterError,
    NotReadyError,
    OverloadedError,
    RequestTimeoutError,
    ServiceError,
    UnknownModelError,
    is_retryable,
    retry_after,
    status_for,
)
from .params import MEDIA_TYPES, ImageFormat, RequestParams, Role

__all__ = [
    "MEDIA_TYPES", "STATUS_BY_ERROR", "DetectionRequest", "ImageFormat", "InvalidParameterError", "NotReadyError",
    "OverloadedError", "RequestParams", "RequestTimeoutError", "Role", "ServiceError", "Timings",
    "UnknownModelError", "error_document", "image_entry", "is_retryable", "model_summary", "response_document",
    "retry_after", "status_for",
]  # fmt: skip
