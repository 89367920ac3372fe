"""Image decoding and mmdetection's test-time preprocessing.

Reference: mmcv ``LoadImageFromFile`` + ``Resize(scale=(1333, 800), keep_ratio=True)``
(``mmcv.imrescale``) + ``DetDataPreprocessor`` (docs/mmdetection-fidelity.md, 'Test-time
preprocessing'): decode to uint8 with EXIF orientation applied, resize the **uint8** image with
OpenCV's ``INTER_LINEAR`` to ``(int(w·s+0.5), int(h·s+0.5))`` with ``s = min(1333/long, 800/short)``,
then normalise in RGB (float32 ``(x - mean) / std``) and zero-pad bottom/right to a multiple of 32.
PIL decoding equals cv2's (measured: max difference 0 on coco-tiny); ``F.interpolate`` does not
equal cv2's resize.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageDecodeError, ImageTooLargeError

MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)
DEFAULT_MAX_PIXELS = 40_000_000
_MEAN_CHW = np.array(MEAN_RGB, dtype=np.float32).reshape(3, 1, 1)
_STD_CHW = np.array(STD_RGB, dtype=np.float32).reshape(3, 1, 1)

# Raster formats a user may send; the rest of PIL's plug-ins (EPS runs Ghostscript, ...) stay closed.
DECODABLE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP")

ImageInput = Union[bytes, bytearray, memoryview, str, os.PathLike, Image.Image, np.ndarray]  # noqa: UP007


@dataclass(frozen=True)
class PreparedImage:
    """One image ready for the network.

    Attributes:
        image_chw: normalised float32 tensor, zero-padded, shape ``(3, pad_h, pad_w)``.
        ori_shape: ``(h, w)`` of the decoded image (after EXIF orientation).
        img_shape: ``(h, w)`` after the keep-ratio resize, before padding.
        pad_shape: ``(h, w)`` after padding (multiples of the size divisor).
        scale_factor: ``(new_w / w, new_h / h)``.
    """

    image_chw: torch.Tensor
    ori_shape: tuple[int, int]
    img_shape: tuple[int, int]
    pad_shape: tuple[int, int]
    scale_factor: tuple[float, float]


def decode_image(image: ImageInput, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode bytes, a path, a PIL image or an RGB uint8 array to an RGB uint8 ``(H, W, 3)`` array.

    EXIF orientation is applied (as cv2's ``IMREAD_COLOR`` does). Grey and alpha images become
    3-channel RGB, alpha dropped. Raises :class:`ImageDecodeError` for anything that is not a
    complete image and :class:`ImageTooLargeError` above ``max_pixels`` (checked from the
    header, before the pixels are decoded).
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ImageDecodeError(f"arrays must be RGB uint8 (H, W, 3), got {image.dtype} {image.shape}")
        _check_pixels(image.shape[1], image.shape[0], max_pixels)
        return np.ascontiguousarray(image)
    if isinstance(image, Image.Image):
        _check_pixels(image.width, image.height, max_pixels)
        return _pil_to_rgb(image)
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        if not data:
            raise ImageDecodeError("the image is empty (0 bytes); send a JPEG, PNG, BMP, GIF, TIFF or WebP file")
        source: io.BytesIO | Path = io.BytesIO(data)
        label = f"{len(data)} bytes"
    else:
        source = Path(image)
        label = str(source)
        if not source.is_file():
            raise ImageDecodeError(f"no image file at {label}")
    try:
        # The pixel limit is checked from the header before any pixel is decoded; PIL's own bomb
        # check (a warning above Image.MAX_IMAGE_PIXELS, an error above twice that) stays as it is.
        with Image.open(source, formats=DECODABLE_FORMATS) as pil:
            _check_pixels(pil.width, pil.height, max_pixels)
            pil.load()
            return _pil_to_rgb(pil)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image has too many pixels to decode safely: {exc}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"{label} is not a recognised image; send a JPEG, PNG, BMP, GIF, TIFF or WebP file"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, ImageDecodeError):
            raise
        raise ImageDecodeError(f"{label} could not be decoded (truncated or corrupt image: {exc})") from None


def _check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has an empty size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels"
        )


def _pil_to_rgb(pil: Image.Image) -> np.ndarray:
    oriented = ImageOps.exif_transpose(pil)
    if oriented is None:  # pragma: no cover - only when in_place=True
        oriented = pil
    if oriented.mode != "RGB":
        oriented = oriented.convert("RGB")
    return np.asarray(oriented, dtype=np.uint8).copy()


def rescale_size(width: int, height: int, max_size: int, min_size: int) -> tuple[int, int]:
    """mmcv ``rescale_size`` with keep-ratio: ``(new_w, new_h)`` for scale ``(max_size, min_size)``."""
    scale = min(max_size / max(height, width), min_size / min(height, width))
    return int(width * float(scale) + 0.5), int(height * float(scale) + 0.5)


def padded_shape(img_shape: tuple[int, int], size_divisor: int) -> tuple[int, int]:
    """Pad ``(h, w)`` up to multiples of ``size_divisor``."""
    h, w = img_shape
    return (-(-h // size_divisor) * size_divisor, -(-w // size_divisor) * size_divisor)


def prepare_image(
    rgb_hwc: np.ndarray, *, min_size: int = 800, max_size: int = 1333, size_divisor: int = 32
) -> PreparedImage:
    """Resize (uint8, cv2 INTER_LINEAR), normalise and pad one decoded RGB image."""
    h, w = rgb_hwc.shape[:2]
    new_w, new_h = rescale_size(w, h, max_size, min_size)
    if new_w < 1 or new_h < 1:
        raise ImageDecodeError(
            f"image is {w}x{h} pixels: too thin to resize to the model's {max_size}x{min_size} scale "
            f"(it would become {new_w}x{new_h}); send an image with a less extreme aspect ratio"
        )
    resized = cv2.resize(rgb_hwc, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    # float32 (x - mean) / std elementwise, as mmdetection's data preprocessor computes it; done in
    # numpy so that preparing images on request threads never starts a torch/OpenMP thread team
    # that would compete with the forward pass for the cores.
    pad_h, pad_w = padded_shape((new_h, new_w), size_divisor)
    padded = np.zeros((3, pad_h, pad_w), dtype=np.float32)
    chw = resized.transpose(2, 0, 1).astype(np.float32)
    padded[:, :new_h, :new_w] = (chw - _MEAN_CHW) / _STD_CHW
    return PreparedImage(
        image_chw=torch.from_numpy(padded),
        ori_shape=(h, w),
        img_shape=(new_h, new_w),
        pad_shape=(pad_h, pad_w),
        scale_factor=(new_w / w, new_h / h),
    )
