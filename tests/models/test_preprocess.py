"""Decoding and mmdetection's resize/normalise/pad, including EXIF and hostile inputs."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from models.errors import ImageDecodeError, ImageTooLargeError
from models.preprocess import decode_image, padded_shape, prepare_image, rescale_size
from tests.conftest import IMAGES, REFERENCE_IMAGES, reference


def _jpeg(array: np.ndarray, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95, **save_kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("image_id", REFERENCE_IMAGES)
def test_shapes_match_mmdetection(image_id: str) -> None:
    ref = reference("faster_rcnn_r50_fpn_gn_ws-all_1x_coco", image_id)
    prepared = prepare_image(decode_image((IMAGES / f"{image_id}.jpg").read_bytes()))
    assert [*prepared.ori_shape] == ref["ori_shape"]
    assert [*prepared.img_shape] == ref["img_shape"]
    assert [*prepared.pad_shape] == ref["pad_shape"]
    assert [*prepared.scale_factor] == ref["scale_factor"]


def test_pil_decoding_equals_cv2_and_padding_is_zero() -> None:
    path = IMAGES / "000000020992.jpg"
    rgb = decode_image(path)
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert np.array_equal(rgb, bgr[:, :, ::-1])
    prepared = prepare_image(rgb)
    h, w = prepared.img_shape
    assert prepared.image_chw[:, h:, :].abs().sum() == 0
    assert prepared.image_chw[:, :, w:].abs().sum() == 0


def test_rescale_size_is_mmcv_rounding() -> None:
    assert rescale_size(640, 424, 1333, 800) == (1208, 800)
    assert rescale_size(358, 640, 1333, 800) == (746, 1333)
    assert padded_shape((800, 1201), 32) == (800, 1216)


def test_exif_orientation_is_applied() -> None:
    array = np.zeros((40, 100, 3), dtype=np.uint8)
    array[:, :10] = 255  # a white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    decoded = decode_image(_jpeg(array, exif=exif.tobytes()))
    assert decoded.shape == (100, 40, 3)
    assert decoded[:10].mean() > 200  # the band is now on top
    assert decoded[-10:].mean() < 50


def test_grey_and_alpha_images_become_rgb() -> None:
    grey = io.BytesIO()
    Image.fromarray(np.full((8, 8), 77, dtype=np.uint8), mode="L").save(grey, format="PNG")
    rgba = io.BytesIO()
    Image.fromarray(np.full((8, 8, 4), 200, dtype=np.uint8), mode="RGBA").save(rgba, format="PNG")
    assert decode_image(grey.getvalue()).shape == (8, 8, 3)
    assert decode_image(rgba.getvalue())[0, 0].tolist() == [200, 200, 200]


def test_bad_inputs_raise_clear_errors() -> None:
    good = (IMAGES / "000000020992.jpg").read_bytes()
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        decode_image(b"hello, this is text")
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        decode_image(good[: len(good) // 2])
    with pytest.raises(ImageDecodeError, match="no image file"):
        decode_image("/nonexistent/image.jpg")


def test_degenerate_aspect_ratio_and_closed_formats_are_decode_errors() -> None:
    """A 3000x1 image would resize to 1333x0 (cv2 would raise); PIL formats beyond rasters are closed."""
    for size in ((3000, 1), (1, 3000)):
        rgb = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        with pytest.raises(ImageDecodeError, match="too thin"):
            prepare_image(rgb)
    assert prepare_image(np.zeros((1, 1, 3), dtype=np.uint8)).img_shape == (800, 800)
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")


def test_pixel_bomb_is_refused_before_decoding() -> None:
    buf = io.BytesIO()
    Image.new("L", (12_000, 12_000)).save(buf, format="PNG")  # compresses to a few KB
    assert len(buf.getvalue()) < 200_000
    with pytest.raises(ImageTooLargeError, match="144000000 pixels"):
        decode_image(buf.getvalue())
    with pytest.raises(ImageTooLargeError, match="limit is 1000 pixels"):
        decode_image((IMAGES / "000000020992.jpg").read_bytes(), max_pixels=1000)
