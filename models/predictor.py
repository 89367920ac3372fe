"""The predictor: images in, COCO-format detections out.

Shared by the HTTP service, the TorchServe handler and the CLI. Following LitServe's shape:
decode → prepare → batch → infer → unbatch → encode, with weights touched only at load time.
A list call returns exactly what one-by-one calls return: GroupNorm statistics include the
padding, so only images with equal padded shapes share a forward pass.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypedDict, overload

import numpy as np
import pycocotools.mask as mask_utils
import torch

from .bake import ModelInfo
from .detector import GNWSDetector
from .precision import Precision, apply_precision, check_precision, parse_precision, resolve_device
from .preprocess import DEFAULT_MAX_PIXELS, ImageInput, PreparedImage, decode_image, prepare_image
from .resolve import ModelRef, resolve_model

__all__ = ["RLE", "Detection", "Predictor", "RawDetections", "resolve_device"]

logger = logging.getLogger(__name__)


class RLE(TypedDict):
    size: list[int]
    counts: str


class Detection(TypedDict, total=False):
    """One detection in COCO results format (plus ``bbox_xyxy`` and ``category_name``)."""

    bbox: list[float]
    bbox_xyxy: list[float]
    score: float
    category_id: int
    category_name: str
    segmentation: RLE


@dataclass(frozen=True)
class RawDetections:
    """Network output for one image, on CPU: boxes xyxy (original pixels), scores, labels, masks.

    ``worker`` names the process that ran the forward pass when that was not this one (a remote
    inference replica); ``None`` for a local forward pass.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None = None
    worker: str | None = None


@dataclass
class Predictor:
    """A loaded detector plus its label space and provenance.

    Attributes:
        model: the network (baked or not), in eval mode on ``device``.
        info: metadata of the weights (config, classes, provenance).
        name: model name shown to users (zoo key or file stem).
        device: where inference runs.
        max_pixels: decompression-bomb guard for decoded images.
        batched_forward: run images of equal padded shape through one forward pass. ``None``
            (default) means on CUDA only: on CPU, oneDNN picks batch-size-dependent conv kernels
            for small feature maps (measured: 1e-6 differences in P5 that move proposals), and a
            batched CPU pass is barely faster (measured 6%), so CPU runs image by image and a
            list call equals one-by-one calls bit for bit.
        precision: ``"fp32"`` (default, exact: what the fidelity tests check), ``"bf16"`` (CPUs
            with AVX-512 BF16 or AMX, CUDA GPUs from Ampere on) or ``"fp16"`` (CUDA). The model is
            set up for it once, when the predictor is made (:func:`models.precision.apply_precision`:
            weights converted once, fp32 islands, channels-last on CPU); a mode the device cannot
            run raises :class:`~models.errors.UnsupportedPrecisionError` then. Detections are
            always fp32 boxes and scores.
    """

    model: GNWSDetector
    info: ModelInfo
    name: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    batched_forward: bool | None = None
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        self.precision = parse_precision(self.precision)
        apply_precision(self.model.eval(), self.precision, self.device)
        if self.batched_forward is None:
            self.batched_forward = self.device.type == "cuda"

    @classmethod
    def load(
        cls,
        source: str | os.PathLike[str] | ModelRef,
        *,
        device: str | torch.device = "auto",
        model_name: str | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        image_scale: tuple[int, int] | None = None,
        precision: Precision | str = "fp32",
    ) -> Predictor:
        """Load a predictor from a model reference (see :mod:`models.resolve`).

        Args:
            source: zoo key (baked into the model store from the download cache on first use),
                model-store name, gnws ``.safetensors`` path, mmdetection ``.pth`` path (with
                ``model_name``), or an already resolved :class:`~models.resolve.ModelRef`.
            device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
            model_name: the name shown to users (default: the reference's name); for an
                mmdetection ``.pth``, its zoo architecture (required).
            max_pixels: pixel limit for decoded images.
            image_scale: ``(max_size, min_size)`` test scale instead of mmdetection's (1333, 800);
                for fast tests and smoke runs only (results then differ from mmdetection's).
            precision: ``"fp32"`` (exact), ``"bf16"`` or ``"fp16"``; see :attr:`precision`.

        Raises:
            PrecisionError: ``precision`` is not one of ``fp32``, ``bf16``, ``fp16``.
            UnsupportedPrecisionError: ``device`` cannot run ``precision`` (checked before the
                weights are read).
        """
        dev = resolve_device(device)
        mode = parse_precision(precision)
        check_precision(mode, dev)
        ref = resolve_model(source, zoo_key=model_name)
        model, info = ref.load()
        name = model_name or ref.name
        if image_scale is not None:
            max_size, min_size = image_scale
            info = replace(info, config=replace(info.config, max_size=max_size, min_size=min_size))
        return cls(model=model, info=info, name=name, device=dev, max_pixels=max_pixels, precision=mode)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.info.config.classes

    @property
    def category_ids(self) -> tuple[int, ...]:
        return self.info.config.category_ids

    @property
    def has_masks(self) -> bool:
        return self.info.config.has_mask

    def decode(self, image: ImageInput) -> np.ndarray:
        """Decode one image to RGB uint8 ``(H, W, 3)`` (EXIF applied), within ``max_pixels``.

        Raises:
            ImageDecodeError: not a complete image of a supported format.
            ImageTooLargeError: more than ``max_pixels`` pixels (checked before decoding).
        """
        return decode_image(image, max_pixels=self.max_pixels)

    def prepare_decoded(self, rgb_hwc: np.ndarray) -> PreparedImage:
        """Resize, normalise and pad an image :meth:`decode` returned."""
        cfg = self.info.config
        return prepare_image(rgb_hwc, min_size=cfg.min_size, max_size=cfg.max_size, size_divisor=cfg.size_divisor)

    def prepare(self, image: ImageInput) -> PreparedImage:
        """Decode (EXIF applied), resize, normalise and pad one image."""
        return self.prepare_decoded(self.decode(image))

    def infer(self, prepared: Sequence[PreparedImage]) -> list[RawDetections]:
        """Run the network on prepared images; results in input order.

        Only images with equal padded shapes share a forward pass (GroupNorm statistics include
        the padding), and only when ``batched_forward`` is on.
        """
        out: list[RawDetections | None] = [None] * len(prepared)
        groups: list[list[int]] = []
        if self.batched_forward:
            by_shape: dict[tuple[int, int], list[int]] = {}
            for i, p in enumerate(prepared):
                by_shape.setdefault(p.pad_shape, []).append(i)
            groups = list(by_shape.values())
        else:
            groups = [[i] for i in range(len(prepared))]
        for indices in groups:
            batch = torch.stack([prepared[i].image_chw for i in indices]).to(self.device, non_blocking=True)
            results = self.model(batch, [prepared[i] for i in indices])
            for i, r in zip(indices, results, strict=True):
                masks = r.get("masks")
                out[i] = RawDetections(
                    boxes=r["boxes"].float().cpu(),
                    scores=r["scores"].float().cpu(),
                    labels=r["labels"].cpu(),
                    masks=masks.cpu() if masks is not None else None,
                )
        return [r for r in out if r is not None]

    def encode(self, raw: RawDetections) -> list[Detection]:
        """COCO-format detections; masks as compressed RLE with ``str`` counts."""
        boxes = raw.boxes.tolist()
        scores = raw.scores.tolist()
        labels = raw.labels.tolist()
        rles: list[Any] = []
        if raw.masks is not None and len(labels):
            rles = mask_utils.encode(np.asfortranarray(raw.masks.permute(1, 2, 0).numpy().astype(np.uint8)))
        detections: list[Detection] = []
        for i, (box, score, label) in enumerate(zip(boxes, scores, labels, strict=True)):
            x1, y1, x2, y2 = box
            det: Detection = {
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "bbox_xyxy": [x1, y1, x2, y2],
                "score": score,
                "category_id": self.category_ids[label],
                "category_name": self.classes[label],
            }
            if raw.masks is not None:
                rle = rles[i]
                det["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
            detections.append(det)
        return detections

    @overload
    def predict(self, images: ImageInput) -> list[Detection]: ...
    @overload
    def predict(self, images: list[ImageInput] | tuple[ImageInput, ...]) -> list[list[Detection]]: ...

    def predict(self, images: ImageInput | list[ImageInput] | tuple[ImageInput, ...]) -> Any:
        """Detections for one image, or a list of per-image detections for a list of images."""
        single = not isinstance(images, list | tuple)
        batch: list[ImageInput] = [images] if single else list(images)  # type: ignore[list-item,arg-type]
        prepared = [self.prepare(img) for img in batch]
        results = [self.encode(r) for r in self.infer(prepared)]
        return results[0] if single else results
