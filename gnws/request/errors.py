"""Domain errors of serving, and the one table mapping every domain error to a status.

Model-side errors (:mod:`models.errors`) and these all derive from :class:`models.GnwsError`.
Every transport looks statuses up here: 4xx for bad input, 413 for too large, 429/503 with
``Retry-After`` under overload, 503 while not ready, never a success status with an error body.
"""

from __future__ import annotations

import math

from models import CheckpointError, GnwsError, ImageDecodeError, ImageTooLargeError, WeightsNotFoundError
from models.errors import ModelReferenceError, PrecisionError, UnknownClassError, UnknownModelNameError


class ServiceError(GnwsError):
    """Base class of errors raised by the service itself.

    Args:
        message: the sentence the client gets as ``detail``.
        retry_after_s: for 429/503, the server's estimate of when a retry can succeed (the
            ``Retry-After`` header is at least the configured ``retry_after_s``).
    """

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ConfigurationError(ServiceError):
    """Settings are invalid (startup only)."""


class UnsupportedMediaTypeError(ServiceError):
    """The request body is neither multipart form data nor an image."""


class PayloadTooLargeError(ServiceError):
    """The request body exceeds the upload limit."""


class BadRequestError(ServiceError):
    """A request is malformed in a way FastAPI's validation cannot see (form without a file, ...)."""


class InvalidParameterError(ServiceError):
    """A query parameter is well-typed but meaningless here (unknown class, wrong model kind, ...)."""


class UnknownModelError(ServiceError):
    """No loaded model has that name."""


class OverloadedError(ServiceError):
    """The queue is full or too many requests are in flight; retry after ``Retry-After`` seconds."""


class RequestTimeoutError(ServiceError):
    """A request waited and ran longer than the per-request timeout."""


class UploadTimeoutError(ServiceError):
    """The client did not finish sending its upload within the per-request timeout."""


class NotReadyError(ServiceError):
    """Models are still loading (or the server is shutting down)."""


class LoadFailedError(NotReadyError):
    """Loading the models failed for good: 503 without ``Retry-After`` (restart the process)."""


class AuthenticationError(ServiceError):
    """The API key is missing or wrong."""


class ReloadDisabledError(ServiceError):
    """Reloads need an API key configured on the server (``GNWS_API_KEY``)."""


class ReloadSourceError(ServiceError):
    """A reload source is outside the model store or not a model file."""


class ConflictError(ServiceError):
    """The request is well-formed but conflicts with what a served model is (409)."""


class ArchitectureMismatchError(ConflictError):
    """A reload would put another architecture behind a served name without being asked to."""


class ReloadFailedError(CheckpointError):
    """A new checkpoint could not be loaded or warmed up; the old model keeps serving."""


# Most specific first: the first class in an error's MRO found here decides its status.
STATUS_BY_ERROR: dict[type[GnwsError], int] = {
    ImageTooLargeError: 413,
    PayloadTooLargeError: 413,
    ImageDecodeError: 400,
    BadRequestError: 400,
    ReloadSourceError: 400,
    ModelReferenceError: 400,
    AuthenticationError: 401,
    ReloadDisabledError: 403,
    UnknownModelError: 404,
    UnknownModelNameError: 404,
    WeightsNotFoundError: 404,
    UnsupportedMediaTypeError: 415,
    InvalidParameterError: 422,
    UnknownClassError: 422,
    PrecisionError: 422,
    CheckpointError: 422,
    UploadTimeoutError: 408,
    ConflictError: 409,
    OverloadedError: 429,
    RequestTimeoutError: 503,
    NotReadyError: 503,
}

RETRYABLE_STATUSES = frozenset({429, 503})


def is_retryable(exc: GnwsError) -> bool:
    """Whether the response gets a ``Retry-After`` header (429/503, unless nothing will change)."""
    return status_for(exc) in RETRYABLE_STATUSES and not isinstance(exc, LoadFailedError)


def retry_after(exc: GnwsError, minimum_s: int) -> int:
    """Whole seconds for ``Retry-After``: the error's own estimate, never below the configured minimum."""
    estimate = exc.retry_after_s if isinstance(exc, ServiceError) else None
    return max(minimum_s, math.ceil(estimate)) if estimate is not None else minimum_s


def message_of(exc: BaseException) -> str:
    """The sentence a client gets for a domain error."""
    return str(exc.args[0]) if exc.args else type(exc).__name__


def status_for(exc: GnwsError) -> int:
    """HTTP status of a domain error (500 for a domain error this table does not know)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500
