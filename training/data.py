"""COCO-format detection data and mmdetection's train pipeline.

Follows mmdetection's ``CocoDataset`` (``mmdet/datasets/coco.py``: ``parse_data_info`` and
``filter_data`` with ``filter_empty_gt=True, min_size=32``) and the train pipeline
``LoadImageFromFile → LoadAnnotations(with_mask) → Resize((1333, 800), keep_ratio) →
RandomFlip(0.5)`` followed by ``DetDataPreprocessor`` (normalise in RGB, pad bottom/right to the
batch maximum rounded up to 32). Crowd annotations are left out of the ground truth (mmdetection
marks them ``ignore`` and never uses them with ``ignore_iof_thr=-1``). Masks (polygons or RLE)
are rasterised with pycocotools at the original size and resized with nearest neighbour, as
``BitmapMasks.rescale`` does.

Two resizes can replace the fixed one (additions to the recipe): multi-scale training, one
``(max, min)`` scale picked at random per image (mmdetection ``RandomChoiceResize(keep_ratio=True)``,
torchvision's reference ``RandomShortestSize``), and large-scale jitter (Ghiasi et al., "Simple
Copy-Paste is a Strong Data Augmentation Method for Instance Segmentation", arXiv:2012.07177;
detectron2 ``ResizeScale`` + ``FixedSizeCrop``): the image is resized to fit an ``S × S`` square
scaled by a random factor, a random ``S × S`` window of it is kept (boxes clipped, boxes left
empty dropped) and it is padded to ``S × S``. Random choices are drawn from ``(seed, epoch,
image id)``, so they do not depend on the worker layout and repeat after ``--resume``.

A file that cannot be read mid-run does not raise in the data loader: the sample becomes a
:class:`SampleFailure` and the batch a :class:`FailedBatch`, so the training loop can stop every
rank together (:func:`training.runtime.first_failure`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from models.errors import ImageDecodeError
from models.preprocess import MEAN_RGB, STD_RGB, decode_image, padded_shape, rescale_size

from .errors import DatasetError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataPaths:
    """Annotation files and image folders of one dataset (``--data ROOT`` defaults)."""

    train_ann: Path
    train_images: Path
    val_ann: Path | None
    val_images: Path | None

    @classmethod
    def from_root(
        cls,
        root: Path | None,
        *,
        train_ann: Path | None = None,
        train_images: Path | None = None,
        val_ann: Path | None = None,
        val_images: Path | None = None,
    ) -> DataPaths:
        """``ROOT/annotations/instances_{train,val}2017.json`` and ``ROOT/{train,val}2017``, overridable."""
        if root is None and (train_ann is None or train_images is None):
            raise DatasetError("give --data ROOT, or both --train-ann and --train-images")
        if root is not None:
            train_ann = train_ann or root / "annotations" / "instances_train2017.json"
            train_images = train_images or root / "train2017"
            val_ann = val_ann or root / "annotations" / "instances_val2017.json"
            val_images = val_images or root / "val2017"
        if train_ann is None or train_images is None:  # pragma: no cover - excluded above
            raise DatasetError("give --data ROOT, or both --train-ann and --train-images")
        return cls(train_ann=train_ann, train_images=train_images, val_ann=val_ann, val_images=val_images)


@dataclass(frozen=True)
class Categories:
    """The label space of a dataset: label ``i`` is ``names[i]`` with category id ``ids[i]``."""

    ids: tuple[int, ...]
    names: tuple[str, ...]


def load_coco(ann_file: Path) -> COCO:
    """Read a COCO annotation file with one clear error for every way it can be wrong."""
    if not ann_file.is_file():
        raise DatasetError(f"no annotation file at {ann_file}; pass the right --data ROOT or --train-ann/--val-ann")
    try:
        data = json.loads(ann_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{ann_file} is not valid JSON ({exc}); fix or re-export the annotation file") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise DatasetError(f"{ann_file} is not a COCO instances file: missing {missing}")
    _check_image_entries(ann_file, data["images"])
    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    except (KeyError, TypeError) as exc:
        raise DatasetError(
            f"{ann_file} has malformed entries (missing field {exc}); check it against the COCO format"
        ) from None
    return coco


IMAGE_FIELDS = ("id", "file_name", "width", "height")


def _check_image_entries(ann_file: Path, images: object) -> None:
    """Every ``images`` entry needs ``id``, ``file_name`` and positive integer ``width``/``height``."""
    if not isinstance(images, list):
        raise DatasetError(f"{ann_file}: 'images' must be a list of image entries, got {type(images).__name__}")
    bad: list[str] = []
    for i, info in enumerate(images):
        if not isinstance(info, dict):
            bad.append(f"entry {i} is not an object")
            continue
        absent = [k for k in IMAGE_FIELDS if k not in info]
        if absent:
            bad.append(f"{info.get('file_name', f'entry {i}')} lacks {', '.join(absent)}")
        elif not all(
            isinstance(info[k], int | float) and not isinstance(info[k], bool) and info[k] > 0
            for k in ("width", "height")
        ):
            bad.append(f"{info['file_name']} has width/height {info['width']!r}x{info['height']!r}")
    if bad:
        raise DatasetError(
            f"{ann_file}: {len(bad)} image entr{'y' if len(bad) == 1 else 'ies'} without a valid "
            f"{'/'.join(IMAGE_FIELDS)} (e.g. {'; '.join(bad[:3])}); every image needs them in the COCO format"
        )


def load_eval_coco(ann_file: Path, image_dir: Path, *, check_files: bool = True) -> COCO:
    """An evaluation set checked up front: the JSON parses, it lists images, and every image file exists.

    Training loads it before its first step (its data check then decodes every file, so it passes
    ``check_files=False``), so broken validation data fails the run at once rather than at the end
    of the first epoch.
    """
    coco = load_coco(ann_file)
    infos = coco.dataset["images"]
    if not infos:
        raise DatasetError(f"{ann_file} lists no images; point --val-ann at a non-empty COCO annotation file")
    if not image_dir.is_dir():
        raise DatasetError(f"no image folder at {image_dir}; fix --data/--val-images")
    if not check_files:
        return coco
    missing = [i["file_name"] for i in infos if not (image_dir / i["file_name"]).is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} evaluation image file(s) listed in {ann_file} are missing under {image_dir}, e.g. "
            f"{', '.join(missing[:3])}; fix --data/--val-images or the annotation file"
        )
    return coco


def categories_of(coco: COCO) -> Categories:
    cats = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
    if not cats:
        raise DatasetError("the annotation file lists no categories")
    return Categories(ids=tuple(int(c["id"]) for c in cats), names=tuple(str(c["name"]) for c in cats))


@dataclass(frozen=True)
class Instances:
    """Non-crowd ground truth of one image in original pixels."""

    boxes_xyxy: np.ndarray  # (G, 4) float32
    labels: np.ndarray  # (G,) int64, 0..C-1
    segmentations: list[object]  # polygons or RLE, one per box


@dataclass
class TrainSample:
    """One augmented image: ``image_chw`` normalised, unpadded; targets in resized pixels."""

    image_chw: torch.Tensor
    img_shape: tuple[int, int]
    boxes_xyxy: torch.Tensor  # (G, 4)
    labels: torch.Tensor  # (G,) 0..C-1
    masks_ghw: torch.Tensor | None  # (G, h, w) uint8, None without masks
    image_id: int
    flipped: bool


class CocoDetection(Dataset):
    """mmdetection's ``CocoDataset`` for training.

    Args:
        ann_file: COCO instances JSON.
        image_dir: folder the ``file_name`` entries are relative to.
        image_scale: ``(max_side, min_side)`` keep-ratio resize target; with ``scale_jitter``,
            ``max_side`` is the side of the square crop.
        flip_prob: probability of a horizontal flip.
        with_masks: rasterise masks (Mask R-CNN).
        min_size: images with a side shorter than this are dropped (mmdet ``min_size=32``).
        seed: random choices (flip, scale, crop) are drawn from ``(seed, epoch, image id)``, so
            they are reproducible whatever the worker layout and after ``--resume``.
        multi_scale: ``(max_side, min_side)`` scales to pick one from per image.
        scale_jitter: ``(low, high)`` factor range of large-scale jitter.
        coco: the already loaded ``ann_file`` (read again when ``None``).
        exclude_images / exclude_annotations: ids the data check found unusable
            (:mod:`training.datacheck`, ``--skip-bad-data``).
    """

    def __init__(
        self,
        ann_file: Path,
        image_dir: Path,
        *,
        image_scale: tuple[int, int] = (1333, 800),
        flip_prob: float = 0.5,
        with_masks: bool = False,
        min_size: int = 32,
        seed: int = 0,
        multi_scale: Sequence[tuple[int, int]] | None = None,
        scale_jitter: tuple[float, float] | None = None,
        coco: COCO | None = None,
        exclude_images: Collection[int] = (),
        exclude_annotations: Collection[int] = (),
    ) -> None:
        self.coco = coco if coco is not None else load_coco(ann_file)
        self.ann_file = ann_file
        self.image_dir = image_dir
        self.image_scale = image_scale
        self.flip_prob = flip_prob
        self.with_masks = with_masks
        self.seed = seed
        self.multi_scale = tuple(multi_scale) if multi_scale else None
        self.scale_jitter = scale_jitter
        self.epoch = 0
        self.excluded_annotations = frozenset(exclude_annotations)
        self.categories = categories_of(self.coco)
        self.cat_to_label = {cid: i for i, cid in enumerate(self.categories.ids)}
        # filter_data: images with at least one annotation of a known category, both sides >= min_size
        with_ann = {
            a["image_id"] for a in self.coco.dataset["annotations"]
            if a.get("category_id") in self.cat_to_label and a.get("id") not in self.excluded_annotations
        }  # fmt: skip
        excluded = set(exclude_images)
        infos = self.coco.loadImgs(sorted(self.coco.getImgIds()))
        self.images = [
            i for i in infos
            if i["id"] in with_ann and i["id"] not in excluded and min(i["width"], i["height"]) >= min_size
        ]  # fmt: skip
        if not self.images:
            raise DatasetError(
                f"{ann_file} has no usable training images: {len(infos)} images, none with an annotation of a "
                f"listed category and both sides >= {min_size} px"
                + (f" ({len(excluded)} left out as unusable)" if excluded else "")
            )
        logger.info("%s: %d of %d images usable for training", ann_file, len(self.images), len(infos))

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def aspect_groups(self) -> list[int]:
        """``1`` for landscape/square (w >= h), ``0`` for portrait: mmdet's AspectRatioBatchSampler."""
        return [1 if i["width"] >= i["height"] else 0 for i in self.images]

    def instances(self, index: int) -> Instances:
        info = self.images[index]
        boxes, labels, segs = [], [], []
        for ann in self.coco.imgToAnns[info["id"]]:
            if (
                ann.get("iscrowd", 0) or ann.get("ignore", False) or ann["category_id"] not in self.cat_to_label
                or ann.get("id") in self.excluded_annotations
            ):  # fmt: skip
                continue
            x1, y1, w, h = ann["bbox"]
            inter_w = max(0.0, min(x1 + w, info["width"]) - max(x1, 0))
            inter_h = max(0.0, min(y1 + h, info["height"]) - max(y1, 0))
            if inter_w * inter_h == 0 or ann.get("area", 1) <= 0 or w < 1 or h < 1:
                continue  # mmdet parse_data_info skips these boxes
            boxes.append([x1, y1, x1 + w, y1 + h])
            labels.append(self.cat_to_label[ann["category_id"]])
            segs.append(ann.get("segmentation"))
        if self.with_masks and any(s is None or (isinstance(s, list) and not s) for s in segs):
            raise DatasetError(
                f"image {info['file_name']} has an annotation without a segmentation; Mask R-CNN needs one"
            )
        return Instances(
            boxes_xyxy=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(labels, dtype=np.int64),
            segmentations=segs,
        )

    def __getitem__(self, index: int) -> TrainSample | SampleFailure:
        info = self.images[index]
        path = self.image_dir / info["file_name"]
        try:
            return self._sample(info, path, self.instances(index))
        except (ImageDecodeError, OSError, DatasetError) as exc:
            return SampleFailure(image_id=int(info["id"]), path=str(path), message=str(exc))

    def _sample(self, info: dict, path: Path, gt: Instances) -> TrainSample:
        rgb = decode_image(path)  # its errors name the file
        h, w = rgb.shape[:2]
        if (h, w) != (info["height"], info["width"]):
            raise DatasetError(f"{path} is {w}x{h} but the annotation file says {info['width']}x{info['height']}")
        rng = random.Random(f"{self.seed}/{self.epoch}/{info['id']}")
        flipped = rng.random() < self.flip_prob  # the first draw: flips are the same with or without jitter
        if self.scale_jitter is not None:
            side = self.image_scale[0]
            factor = rng.uniform(*self.scale_jitter)
            scale = min(side * factor / h, side * factor / w)  # detectron2 ResizeScale
            new_w, new_h = max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5))
        else:
            max_side, min_side = rng.choice(self.multi_scale) if self.multi_scale else self.image_scale
            new_w, new_h = rescale_size(w, h, max_side, min_side)
        rgb = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        sx, sy = new_w / w, new_h / h
        boxes = gt.boxes_xyxy * np.array([sx, sy, sx, sy], dtype=np.float32)
        labels = gt.labels
        masks = None
        if self.with_masks:
            masks = np.zeros((len(gt.segmentations), new_h, new_w), dtype=np.uint8)
            for g, seg in enumerate(gt.segmentations):
                full = segmentation_to_mask(seg, h, w)
                masks[g] = cv2.resize(full, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
        if self.scale_jitter is not None:  # detectron2 FixedSizeCrop: a random window of at most side x side
            side = self.image_scale[0]
            crop_h, crop_w = min(new_h, side), min(new_w, side)
            y0, x0 = round((new_h - crop_h) * rng.random()), round((new_w - crop_w) * rng.random())
            rgb = rgb[y0 : y0 + crop_h, x0 : x0 + crop_w]
            boxes = boxes - np.array([x0, y0, x0, y0], dtype=np.float32)
            if masks is not None:
                masks = masks[:, y0 : y0 + crop_h, x0 : x0 + crop_w]
            new_h, new_w = crop_h, crop_w
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, new_w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, new_h)
        if self.scale_jitter is not None:  # boxes the crop cut away entirely
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, labels = boxes[keep], labels[keep]
            masks = masks[keep] if masks is not None else None
        if flipped:
            rgb = rgb[:, ::-1]
            boxes = boxes.copy()
            boxes[:, [0, 2]] = new_w - boxes[:, [2, 0]]
            if masks is not None:
                masks = masks[:, :, ::-1]
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float()
        image = (image - torch.tensor(MEAN_RGB).view(3, 1, 1)) / torch.tensor(STD_RGB).view(3, 1, 1)
        if self.scale_jitter is not None:  # pad to the fixed square (zeros after normalisation, as collate pads)
            side = self.image_scale[0]
            image = torch.nn.functional.pad(image, (0, side - new_w, 0, side - new_h))
        return TrainSample(
            image_chw=image,
            img_shape=(new_h, new_w),
            boxes_xyxy=torch.from_numpy(np.ascontiguousarray(boxes)),
            labels=torch.from_numpy(np.ascontiguousarray(labels)),
            masks_ghw=torch.from_numpy(np.ascontiguousarray(masks)) if masks is not None else None,
            image_id=int(info["id"]),
            flipped=flipped,
        )


def segmentation_to_mask(segmentation: object, height: int, width: int) -> np.ndarray:
    """Polygons, uncompressed or compressed RLE → ``(height, width)`` uint8 mask (pycocotools)."""
    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        rle = segmentation
    else:
        raise DatasetError(f"unsupported segmentation of type {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(np.uint8)


@dataclass(frozen=True)
class SampleFailure:
    """A training image that could not be read mid-run (in place of its :class:`TrainSample`)."""

    image_id: int
    path: str
    message: str


@dataclass(frozen=True)
class FailedBatch:
    """A batch with at least one :class:`SampleFailure`: the training loop stops every rank on it."""

    failures: list[SampleFailure]

    @property
    def message(self) -> str:
        first = self.failures[0].message
        more = f" (and {len(self.failures) - 1} more image(s) of the batch)" if len(self.failures) > 1 else ""
        return first + more


@dataclass
class TrainBatch:
    """A padded batch: ``images_nchw`` zero-padded to the batch maximum (multiple of 32)."""

    images_nchw: torch.Tensor
    img_shapes: list[tuple[int, int]]
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    masks: list[torch.Tensor] | None
    image_ids: list[int]

    def to(self, device: torch.device) -> TrainBatch:
        return TrainBatch(
            images_nchw=self.images_nchw.to(device, non_blocking=True),
            img_shapes=self.img_shapes,
            boxes=[b.to(device, non_blocking=True) for b in self.boxes],
            labels=[lab.to(device, non_blocking=True) for lab in self.labels],
            masks=[m.to(device, non_blocking=True) for m in self.masks] if self.masks is not None else None,
            image_ids=self.image_ids,
        )


def collate(samples: list[TrainSample | SampleFailure], size_divisor: int = 32) -> TrainBatch | FailedBatch:
    """Stack samples, padding bottom/right with zeros (after normalisation) as mmdetection does.

    A batch with an unreadable image becomes a :class:`FailedBatch`.
    """
    failures = [s for s in samples if isinstance(s, SampleFailure)]
    if failures:
        return FailedBatch(failures)
    return _stack([s for s in samples if isinstance(s, TrainSample)], size_divisor)


def _stack(samples: list[TrainSample], size_divisor: int) -> TrainBatch:
    max_h = max(s.image_chw.shape[1] for s in samples)
    max_w = max(s.image_chw.shape[2] for s in samples)
    pad_h, pad_w = padded_shape((max_h, max_w), size_divisor)
    images = samples[0].image_chw.new_zeros((len(samples), 3, pad_h, pad_w))
    for i, s in enumerate(samples):
        images[i, :, : s.image_chw.shape[1], : s.image_chw.shape[2]] = s.image_chw
    has_masks = samples[0].masks_ghw is not None
    return TrainBatch(
        images_nchw=images,
        img_shapes=[s.img_shape for s in samples],
        boxes=[s.boxes_xyxy for s in samples],
        labels=[s.labels for s in samples],
        masks=[s.masks_ghw for s in samples if s.masks_ghw is not None] if has_masks else None,
        image_ids=[s.image_id for s in samples],
    )
