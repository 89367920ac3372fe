"""Choosing and shaping detections for a client: class filters, score/count limits, mask outlines.

Shared by the HTTP service and the TorchServe handler, so both answer the same query parameters
(``classes``, ``score_threshold``, ``max_detections``, ``polygons``) with the same detections.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

import cv2
import numpy as np
import torch

from .errors import UnknownClassError
from .predictor import RawDetections


def class_indices(
    classes: Sequence[str], category_ids: Sequence[int], wanted: Iterable[str], *, model_name: str
) -> list[int] | None:
    """Label indices for ``wanted`` class names (any case) or COCO category ids; ``None`` for all.

    Each item of ``wanted`` may hold several comma-separated tokens.

    Raises:
        UnknownClassError: a token is neither a class name nor a category id of the model.
    """
    tokens = [t.strip() for item in wanted for t in item.split(",") if t.strip()]
    if not tokens:
        return None
    by_name = {name.lower(): i for i, name in enumerate(classes)}
    by_id = {str(cid): i for i, cid in enumerate(category_ids)}
    indices: list[int] = []
    for token in tokens:
        index = by_id.get(token, by_name.get(token.lower()))
        if index is None:
            close = difflib.get_close_matches(token.lower(), list(by_name), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise UnknownClassError(
                f"classes: {token!r} is neither a class name nor a category id of {model_name}.{hint}"
            )
        indices.append(index)
    return sorted(set(indices))


def select_detections(
    raw: RawDetections,
    *,
    score_threshold: float | None = None,
    labels: Sequence[int] | None = None,
    max_detections: int | None = None,
    keep_masks: bool = True,
) -> RawDetections:
    """The detections passing the filters, in the predictor's order; ``max_detections`` keeps the best."""
    keep = torch.ones(raw.scores.shape[0], dtype=torch.bool)
    if score_threshold is not None:
        keep &= raw.scores >= score_threshold
    if labels is not None:
        keep &= torch.isin(raw.labels, torch.tensor(list(labels), dtype=raw.labels.dtype))
    idx = keep.nonzero().flatten()
    if max_detections is not None and idx.numel() > max_detections:
        best = torch.argsort(raw.scores[idx], descending=True, stable=True)[:max_detections]
        idx = idx[best.sort().values]
    masks = raw.masks[idx] if keep_masks and raw.masks is not None else None
    return RawDetections(boxes=raw.boxes[idx], scores=raw.scores[idx], labels=raw.labels[idx], masks=masks)


def mask_polygons(mask_hw: torch.Tensor) -> list[list[float]]:
    """Outer outlines of a binary mask as flat ``[x1, y1, x2, y2, ...]`` lists (3+ points each).

    A part too thin for a 3-point outline (a pixel, a one-pixel line) becomes its bounding rectangle,
    so every non-empty mask has at least one polygon.
    """
    mask = np.ascontiguousarray(mask_hw.numpy().astype(np.uint8))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons: list[list[float]] = []
    for contour in contours:
        points = contour.reshape(-1, 2)
        if len(points) >= 3:
            polygons.append(points.reshape(-1).astype(float).tolist())
        else:
            x0, y0 = points.min(axis=0).tolist()
            x1, y1 = (points.max(axis=0) + 1).tolist()
            polygons.append([float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)])
    return polygons
