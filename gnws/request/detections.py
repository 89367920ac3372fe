"""One request's parameters bound to the model that answers it: selection, encoding, drawing.

:meth:`DetectionRequest.bind` checks what can only be checked against the model (its classes,
whether it has masks); :meth:`DetectionRequest.select` applies the class, score and count filters
to the network output; :meth:`DetectionRequest.encode` turns the result into COCO-format
detections (boxes, compressed RLE masks, optional polygons) and :meth:`DetectionRequest.draw`
into PNG/JPEG bytes. Every transport calls these, so they all answer the same parameters with the
same detections.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from models import Predictor, RawDetections, selection
from models.draw import draw_detections
from models.errors import UnknownClassError

from .errors import InvalidParameterError
from .params import RequestParams, Role


@dataclass(frozen=True)
class Timings:
    """Milliseconds spent per stage for one image (``inference_ms`` is shared by its whole batch)."""

    prepare_ms: float
    queue_ms: float
    inference_ms: float
    encode_ms: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class DetectionRequest:
    """A request's parameters checked against the predictor that answers it.

    Attributes:
        predictor: the model that answers.
        params: the request's parameters.
        role: ``detect`` (boxes) or ``segment`` (boxes and masks).
        labels: label indices the ``classes`` parameter selects; ``None`` for all.
    """

    predictor: Predictor
    params: RequestParams
    role: Role
    labels: list[int] | None

    @classmethod
    def bind(
        cls, predictor: Predictor, params: RequestParams, role: Role, *, name: str | None = None
    ) -> DetectionRequest:
        """Check ``params`` against ``predictor``.

        Args:
            name: the model's served name, for messages (default: the predictor's).

        Raises:
            InvalidParameterError: ``segment`` on a model without masks, an unknown class.
        """
        shown = name or predictor.name
        if role == "segment" and not predictor.has_masks:
            raise InvalidParameterError(f"model {shown} has no mask head; segmentation needs a Mask R-CNN model")
        try:
            labels = selection.class_indices(predictor.classes, predictor.category_ids, params.classes,
                                             model_name=shown)
        except UnknownClassError as exc:
            raise InvalidParameterError(str(exc)) from None
        return cls(predictor=predictor, params=params, role=role, labels=labels)

    def select(self, raw: RawDetections) -> RawDetections:
        """The detections passing the filters, in the predictor's order (masks only for ``segment``)."""
        p = self.params
        return selection.select_detections(raw, score_threshold=p.score_threshold, labels=self.labels,
                                           max_detections=p.max_detections, keep_masks=self.role == "segment")

    def encode(self, raw: RawDetections) -> list[dict[str, Any]]:
        """COCO-format detections of one image: filtered, masks as RLE, polygons on request."""
        chosen = self.select(raw)
        detections: list[dict[str, Any]] = [dict(d) for d in self.predictor.encode(chosen)]
        if self.params.polygons and chosen.masks is not None:
            for det, mask in zip(detections, chosen.masks, strict=True):
                det["polygons"] = selection.mask_polygons(mask)
        return detections

    def draw(self, rgb_hwc: np.ndarray, detections: Sequence[dict[str, Any]]) -> bytes:
        """The image with ``detections`` drawn, encoded as the request's ``format`` (PNG or JPEG)."""
        if self.params.format == "json":
            raise InvalidParameterError("format=json returns detections, not an image")
        image = draw_detections(rgb_hwc, detections)  # type: ignore[arg-type]  # COCO-format dicts
        buffer = io.BytesIO()
        image.save(buffer, format="PNG" if self.params.format == "png" else "JPEG", quality=90)
        return buffer.getvalue()
