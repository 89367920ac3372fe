"""Reading request bodies: multipart files or a raw image body, never past the limits.

A body is consumed as a stream, under :class:`UploadLimits`:

- size: refused with 413 as soon as it passes ``max_bytes`` (the ``Content-Length`` header is
  checked first, so honest clients are refused before they send);
- stalls: no bytes for ``idle_timeout_s`` seconds ends the upload with 408;
- trickles: after the first ``idle_timeout_s`` seconds, an upload arriving slower than
  ``min_rate`` bytes per second on average ends with 408.

So a client that opens a request and sends a few bytes, or one byte every few seconds, holds its
upload place for seconds, not for the request timeout. Form parts are spooled by Starlette's
parser (memory up to 1 MB each, then a temporary file).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from gnws.request.errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError, UploadTimeoutError

RAW_MEDIA_TYPES = ("application/octet-stream",)
IMAGE_HINT = "send a JPEG, PNG, BMP, GIF, TIFF or WebP image as a multipart file (curl -F file=@image.jpg) or as the raw body with Content-Type image/*"  # noqa: E501
MAX_FORM_FIELDS = 16
MAX_FIELD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Upload:
    """One image as sent: its bytes and, for multipart, its file name."""

    data: bytes
    filename: str | None = None


@dataclass(frozen=True)
class UploadLimits:
    """How much, and how slowly, a client may send.

    Attributes:
        max_bytes: body size limit (413 above it).
        idle_timeout_s: longest pause between two pieces of the body (408 after it).
        min_rate: least average bytes per second once ``idle_timeout_s`` has passed (408 below
            it); 0 turns the rate check off.
    """

    max_bytes: int
    idle_timeout_s: float = 5.0
    min_rate: int = 0


def _too_large(max_bytes: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the request body is larger than the {max_bytes}-byte upload limit; send a smaller image"
    )


def check_declared_length(request: Request, max_bytes: int) -> None:
    """Refuse at once a body whose ``Content-Length`` already says it is too large."""
    length = request.headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise _too_large(max_bytes)


async def guarded(stream: AsyncIterator[bytes], limits: UploadLimits) -> AsyncGenerator[bytes, None]:
    """``stream``'s chunks, refused once they pass the size limit or arrive too slowly.

    Raises:
        PayloadTooLargeError: more than ``limits.max_bytes``.
        UploadTimeoutError: a pause longer than ``idle_timeout_s``, or a rate below ``min_rate``.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    total = 0
    chunks = stream.__aiter__()
    while True:
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the cancellation of an
            # enclosing timeout (the request's) when a chunk arrives at the same moment.
            async with asyncio.timeout(limits.idle_timeout_s):
                chunk = await chunks.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise UploadTimeoutError(
                f"the upload stalled: no data for {limits.idle_timeout_s:g} s ({total} bytes received); "
                "send the whole body without pauses"
            ) from None
        total += len(chunk)
        if total > limits.max_bytes:
            raise _too_large(limits.max_bytes)
        elapsed = loop.time() - start
        if limits.min_rate and elapsed > limits.idle_timeout_s and total < limits.min_rate * elapsed:
            raise UploadTimeoutError(
                f"the upload is too slow: {total} bytes in {elapsed:.1f} s, below the server's minimum of "
                f"{limits.min_rate} bytes/s"
            )
        yield chunk


async def read_body(request: Request, limits: UploadLimits) -> bytes:
    """The whole body, read under ``limits``."""
    check_declared_length(request, limits.max_bytes)
    body = bytearray()
    try:
        async for chunk in guarded(request.stream(), limits):
            body += chunk
    except ClientDisconnect:
        raise BadRequestError("the client disconnected before the body was complete") from None
    return bytes(body)


async def read_uploads(request: Request, limits: UploadLimits, *, max_files: int) -> list[Upload]:
    """The images in ``request``, in order.

    Raises:
        PayloadTooLargeError: the body is larger than ``limits.max_bytes``.
        UploadTimeoutError: the body stalled or trickled (see :class:`UploadLimits`).
        UnsupportedMediaTypeError: neither ``multipart/form-data`` nor ``image/*``/octet-stream.
        BadRequestError: a malformed form, no file in it, or too many files.
    """
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        check_declared_length(request, limits.max_bytes)
        try:
            return await _read_form(request, limits, max_files=max_files)
        except ClientDisconnect:
            raise BadRequestError("the client disconnected before the body was complete") from None
    if media_type.startswith("image/") or media_type in RAW_MEDIA_TYPES:
        return [Upload(data=await read_body(request, limits))]
    shown = media_type or "no Content-Type"
    raise UnsupportedMediaTypeError(f"cannot read an image from {shown}; {IMAGE_HINT}")


async def _read_form(request: Request, limits: UploadLimits, *, max_files: int) -> list[Upload]:
    parser = MultiPartParser(
        request.headers,
        guarded(request.stream(), limits),
        max_files=max_files,
        max_fields=MAX_FORM_FIELDS,
        max_part_size=MAX_FIELD_BYTES,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BadRequestError(f"malformed multipart form: {exc.message}; {IMAGE_HINT}") from None
    try:
        uploads = []
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                uploads.append(Upload(data=await value.read(), filename=value.filename))
    finally:
        await form.close()
    if not uploads:
        raise BadRequestError(f"the form has no file part; {IMAGE_HINT}")
    return uploads
