"""Reading images from a request: multipart files or a raw image body, never past the size limit.

The body is consumed as a stream and refused with 413 as soon as it passes ``max_bytes`` (the
``Content-Length`` header is checked first, so honest clients are refused before sending). Form
parts are spooled by Starlette's parser (memory up to 1 MB each, then a temporary file).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from .errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError

RAW_MEDIA_TYPES = ("application/octet-stream",)
IMAGE_HINT = "send a JPEG, PNG, BMP, GIF, TIFF or WebP image as a multipart file (curl -F file=@image.jpg) or as the raw body with Content-Type image/*"  # noqa: E501
MAX_FORM_FIELDS = 16
MAX_FIELD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Upload:
    """One image as sent: its bytes and, for multipart, its file name."""

    data: bytes
    filename: str | None = None


def _too_large(max_bytes: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the request body is larger than the {max_bytes}-byte upload limit; send a smaller image"
    )


async def _limited(stream: AsyncIterator[bytes], max_bytes: int) -> AsyncGenerator[bytes, None]:
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > max_bytes:
            raise _too_large(max_bytes)
        yield chunk


async def read_uploads(request: Request, *, max_bytes: int, max_files: int) -> list[Upload]:
    """The images in ``request``, in order.

    Raises:
        PayloadTooLargeError: the body is larger than ``max_bytes``.
        UnsupportedMediaTypeError: neither ``multipart/form-data`` nor ``image/*``/octet-stream.
        BadRequestError: a malformed form, no file in it, or too many files.
    """
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    length = request.headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise _too_large(max_bytes)
    try:
        if media_type == "multipart/form-data":
            return await _read_form(request, max_bytes=max_bytes, max_files=max_files)
        if media_type.startswith("image/") or media_type in RAW_MEDIA_TYPES:
            body = bytearray()
            async for chunk in _limited(request.stream(), max_bytes):
                body += chunk
            return [Upload(data=bytes(body))]
    except ClientDisconnect:
        raise BadRequestError("the client disconnected before the body was complete") from None
    shown = media_type or "no Content-Type"
    raise UnsupportedMediaTypeError(f"cannot read an image from {shown}; {IMAGE_HINT}")


async def _read_form(request: Request, *, max_bytes: int, max_files: int) -> list[Upload]:
    parser = MultiPartParser(
        request.headers,
        _limited(request.stream(), max_bytes),
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
