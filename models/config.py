"""Detector configuration and the COCO label space.

Configs are frozen, keyword-only dataclasses (no registries, no config inheritance); variants are
made with ``dataclasses.replace``. A config is JSON-serialisable with :func:`config_to_json` /
:func:`config_from_json` so it can travel in ``.safetensors`` metadata. The defaults are
mmdetection's GN+WS test settings (docs/mmdetection-fidelity.md, 'Test-time preprocessing' and
'Test-time post-processing'); labels follow mmdetection's ``CocoDataset`` order ('Checkpoint
conversion').
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

Arch = Literal["faster_rcnn", "mask_rcnn"]

# mmdetection's CocoDataset.METAINFO['classes']: label i <-> COCO_CATEGORY_IDS[i].
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

COCO_CATEGORY_IDS: tuple[int, ...] = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
    *range(72, 83), *range(84, 91),
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class DetectorConfig:
    """Architecture of one GN+WS two-stage detector.

    Attributes:
        arch: ``"faster_rcnn"`` or ``"mask_rcnn"``.
        depth: ResNet/ResNeXt depth, 50 or 101.
        groups: 1 for ResNet, 32 for ResNeXt-32x4d.
        width_per_group: 64 for ResNet, 4 for ResNeXt-32x4d.
        classes: class names, label ``i`` is ``classes[i]`` (background excluded).
        category_ids: the dataset category id of each class (COCO ids for the zoo models).
        gn_groups: GroupNorm groups everywhere GN is used.
        min_size / max_size: the keep-ratio resize target (short, long) side.
        size_divisor: images are padded bottom/right to a multiple of this.
        rpn_nms_pre / rpn_max_per_img / rpn_nms_iou: RPN test-time proposal settings.
        score_thr / nms_iou / max_per_img: R-CNN test-time settings.
        mask_thr: mask binarisation threshold (``>=``).
    """

    arch: Arch
    depth: int = 50
    groups: int = 1
    width_per_group: int = 64
    classes: tuple[str, ...] = COCO_CLASSES
    category_ids: tuple[int, ...] = COCO_CATEGORY_IDS
    gn_groups: int = 32
    min_size: int = 800
    max_size: int = 1333
    size_divisor: int = 32
    rpn_nms_pre: int = 1000
    rpn_max_per_img: int = 1000
    rpn_nms_iou: float = 0.7
    score_thr: float = 0.05
    nms_iou: float = 0.5
    max_per_img: int = 100
    mask_thr: float = 0.5

    def __post_init__(self) -> None:
        if self.arch not in ("faster_rcnn", "mask_rcnn"):
            raise ValueError(f"arch must be 'faster_rcnn' or 'mask_rcnn', got {self.arch!r}")
        if self.depth not in (50, 101):
            raise ValueError(f"depth must be 50 or 101, got {self.depth}")
        if len(self.classes) != len(self.category_ids):
            raise ValueError(
                f"{len(self.classes)} class names but {len(self.category_ids)} category ids; "
                "give one id per class"
            )
        if not self.classes:
            raise ValueError("a detector needs at least one class")

    @property
    def num_classes(self) -> int:
        """Number of foreground classes (the heads add one background slot at index 0)."""
        return len(self.classes)

    @property
    def has_mask(self) -> bool:
        return self.arch == "mask_rcnn"


def config_to_json(cfg: DetectorConfig) -> str:
    """Serialise a config to a JSON string."""
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def config_from_json(text: str) -> DetectorConfig:
    """Parse :func:`config_to_json` output; unknown fields are rejected."""
    data: dict[str, Any] = json.loads(text)
    names = {f.name for f in dataclasses.fields(DetectorConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown DetectorConfig fields {unknown}; this file needs a newer gnws")
    for key in ("classes", "category_ids"):
        if key in data:
            data[key] = tuple(data[key])
    return DetectorConfig(**data)
