"""Drawing detections (boxes, labels, masks) on an image with Pillow."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, ImageDraw, ImageFont

from .predictor import Detection


def color_for(category_id: int) -> tuple[int, int, int]:
    """A stable, distinct colour per category."""
    rng = np.random.default_rng(category_id * 7919)
    r, g, b = (int(v) for v in rng.integers(64, 256, size=3))
    return r, g, b


def draw_detections(
    image: Image.Image | np.ndarray, detections: Sequence[Detection], *, mask_alpha: float = 0.45
) -> Image.Image:
    """A copy of ``image`` (RGB) with masks blended in, boxes outlined and ``name score`` labels."""
    canvas = np.array(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    for det in detections:
        seg = det.get("segmentation")
        if seg is not None:
            mask = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode("ascii")}).astype(bool)
            canvas[mask] = canvas[mask] * (1 - mask_alpha) + np.array(color_for(det["category_id"])) * mask_alpha
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for det in detections:
        x1, y1, x2, y2 = det["bbox_xyxy"]
        color = color_for(det["category_id"])
        draw.rectangle([x1, y1, x2, y2], outline=color, width=2)
        text = f"{det['category_name']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        draw.rectangle([left, top - (bottom - top), right + 2, top], fill=color)
        draw.text((x1 + 1, y1 - (bottom - top)), text, fill=(0, 0, 0), font=font)
    return out
