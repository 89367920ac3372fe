"""The data check before the first step: every image decoded once, every annotation looked at.

A broken file found at iteration 40,000 wastes the hours before it; so before training starts,
every training image the recipe will use and every validation image is decoded (in a thread pool,
with a progress bar on a terminal) exactly as the data loader will decode it, and every annotation
is checked. What the check counts as unusable, by reason:

- images: the file is missing; it does not decode (truncated or corrupt, or not an image); its
  decoded size differs from the ``width``/``height`` of its entry (the boxes would be off);
- annotations: the box is malformed or has zero or negative width or height; the category id is not
  in ``categories``; the image id is not in ``images``; for Mask R-CNN, no segmentation.

Any of these stops the run with one sentence naming the counts and the first files, unless
``--skip-bad-data`` is given: then the run warns with the same counts and leaves them out (an image
with a broken file goes with all its annotations; a broken annotation goes alone).

What the recipe itself leaves out is reported, not refused (mmdetection's ``CocoDataset`` does the
same): training images without an annotation of a listed category or with a side under
``min_size``; crowd-only images are counted too (they train as background only, as in mmdetection).

Decoding is cached per file by size and modification time in ``<run>/data_check.json``, so a
resumed run re-decodes only the files that changed since.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pycocotools.coco import COCO
from tqdm import tqdm

from models.errors import ImageDecodeError
from models.files import atomic_write_bytes
from models.preprocess import decode_image

from .config import TrainConfig
from .data import load_coco, load_eval_coco
from .errors import DatasetError, TrainingError
from .runtime import DistContext, broadcast_from_main, show_progress

logger = logging.getLogger(__name__)

Split = Literal["training", "validation"]

CACHE_FILE = "data_check.json"
CACHE_FORMAT = 1
MAX_THREADS = 16
EXAMPLES = 3

MISSING = "missing file"
UNDECODABLE = "undecodable image"
SIZE_MISMATCH = "size differs from its width/height"
BAD_BOX = "zero/negative-size or malformed box"
UNKNOWN_CATEGORY = "category id not in categories"
UNKNOWN_IMAGE = "image id not in images"
NO_SEGMENTATION = "no segmentation (Mask R-CNN needs one)"
IMAGE_REASONS = (MISSING, UNDECODABLE, SIZE_MISMATCH)
ANNOTATION_REASONS = (BAD_BOX, UNKNOWN_CATEGORY, UNKNOWN_IMAGE, NO_SEGMENTATION)


@dataclass(frozen=True)
class FileCheck:
    """One image file as last decoded: its size and mtime (the cache key), and what came out."""

    size: int
    mtime_ns: int
    shape_hw: tuple[int, int] | None
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "mtime_ns": self.mtime_ns, "shape_hw": self.shape_hw, "error": self.error}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FileCheck:
        shape = data.get("shape_hw")
        return cls(
            size=int(data["size"]), mtime_ns=int(data["mtime_ns"]),
            shape_hw=(int(shape[0]), int(shape[1])) if shape else None, error=data.get("error"),
        )  # fmt: skip


def probe_image(path: Path) -> FileCheck | None:
    """Decode ``path`` as the data loader will; ``None`` when the file does not exist."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    try:
        rgb = decode_image(path)
    except (ImageDecodeError, OSError) as exc:
        return FileCheck(size=stat.st_size, mtime_ns=stat.st_mtime_ns, shape_hw=None, error=str(exc))
    return FileCheck(size=stat.st_size, mtime_ns=stat.st_mtime_ns, shape_hw=(rgb.shape[0], rgb.shape[1]), error=None)


class DecodeCache:
    """``{absolute path: FileCheck}``, valid for a file while its size and mtime are unchanged."""

    def __init__(self, entries: dict[str, FileCheck] | None = None) -> None:
        self.entries: dict[str, FileCheck] = dict(entries or {})

    @classmethod
    def read(cls, path: Path) -> DecodeCache:
        """The cache at ``path``; empty when missing or unreadable (it is only an optimisation)."""
        try:
            data = json.loads(path.read_text())
            if data.get("format") != CACHE_FORMAT:
                return cls()
            return cls({k: FileCheck.from_json(v) for k, v in data["files"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
            return cls()

    def write(self, path: Path) -> None:
        files = {k: v.to_json() for k, v in sorted(self.entries.items())}
        atomic_write_bytes(path, json.dumps({"format": CACHE_FORMAT, "files": files}).encode())

    def lookup(self, path: Path) -> FileCheck | None:
        entry = self.entries.get(str(path.absolute()))
        if entry is None:
            return None
        try:
            stat = path.stat()
        except OSError:
            return None
        return entry if (stat.st_size, stat.st_mtime_ns) == (entry.size, entry.mtime_ns) else None


def decode_all(
    paths: Iterable[Path], cache: DecodeCache, *, progress: bool = False, desc: str = "check images"
) -> tuple[dict[Path, FileCheck | None], int]:
    """Every path's :class:`FileCheck` (``None``: missing), decoding in threads what the cache lacks.

    Returns:
        The checks, and how many files were decoded (the rest came from the cache).
    """
    paths = list(dict.fromkeys(paths))
    results: dict[Path, FileCheck | None] = {}
    todo: list[Path] = []
    for path in paths:
        hit = cache.lookup(path)
        if hit is None:
            todo.append(path)
        else:
            results[path] = hit
    threads = max(1, min(MAX_THREADS, os.cpu_count() or 1, len(todo)))
    with (
        ThreadPoolExecutor(threads, thread_name_prefix="datacheck") as pool,
        tqdm(total=len(todo), desc=desc, unit="img", disable=not progress, leave=False) as bar,
    ):  # PIL releases the GIL while it decodes
        for path, check in zip(todo, pool.map(probe_image, todo), strict=True):
            results[path] = check
            if check is not None:
                cache.entries[str(path.absolute())] = check
            bar.update(1)
    return results, len(todo)


@dataclass
class DataReport:
    """What the check found in one annotation file.

    Attributes:
        bad_images / bad_annotations: reason → examples (``file.jpg: detail``), one per item.
        excluded_image_ids / excluded_annotation_ids: what ``--skip-bad-data`` leaves out.
        filtered: what the recipe leaves out anyway (reported, never an error), by reason.
    """

    split: Split
    ann_file: str
    num_images: int
    num_annotations: int
    bad_images: dict[str, list[str]] = field(default_factory=dict)
    bad_annotations: dict[str, list[str]] = field(default_factory=dict)
    excluded_image_ids: set[int] = field(default_factory=set)
    excluded_annotation_ids: set[int] = field(default_factory=set)
    filtered: dict[str, int] = field(default_factory=dict)
    decoded: int = 0
    checked_files: int = 0

    @property
    def ok(self) -> bool:
        return not self.bad_images and not self.bad_annotations

    def counts(self) -> str:
        """``2 unusable images (1 missing file, 1 undecodable image) and 1 unusable annotation (...)``."""
        parts = []
        for what, items in (("image", self.bad_images), ("annotation", self.bad_annotations)):
            total = sum(len(v) for v in items.values())
            if total:
                detail = ", ".join(f"{len(v)} {reason}" for reason, v in items.items())
                parts.append(f"{total} unusable {what}{'' if total == 1 else 's'} ({detail})")
        return " and ".join(parts) or "no unusable image or annotation"

    def examples(self, n: int = EXAMPLES) -> str:
        groups = (*self.bad_images.values(), *self.bad_annotations.values())
        return "; ".join([ex for examples in groups for ex in examples][:n])

    def error_message(self) -> str:
        return (
            f"the {self.split} data in {self.ann_file} has {self.counts()} among {self.num_images} images and "
            f"{self.num_annotations} annotations, e.g. {self.examples()}; fix or remove them, or pass "
            "--skip-bad-data to train without them"
        )

    def warning_message(self) -> str:
        return (
            f"--skip-bad-data: leaving out {self.counts()} of the {self.split} data in {self.ann_file} "
            f"({self.num_images} images, {self.num_annotations} annotations), e.g. {self.examples()}"
        )

    def filtered_message(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in self.filtered.items() if n)


def _bbox_problem(bbox: object) -> str | None:
    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        return f"bbox {bbox!r} is not [x, y, w, h]"
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        return f"bbox {list(bbox)!r} has a non-number"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return f"bbox {list(bbox)!r} has width or height <= 0"
    return None


def _no_segmentation(segmentation: object) -> bool:
    return segmentation is None or (isinstance(segmentation, list | dict) and not segmentation)


def check_dataset(
    coco: COCO,
    ann_file: Path,
    image_dir: Path,
    *,
    split: Split,
    cache: DecodeCache,
    with_masks: bool = False,
    min_size: int = 32,
    progress: bool = False,
) -> DataReport:
    """Check one annotation file and its images (see the module docstring for the reasons).

    Args:
        coco: the loaded annotation file (:func:`training.data.load_coco`).
        split: ``training`` decodes only the images the recipe uses (with an annotation of a
            listed category and both sides >= ``min_size``); ``validation`` decodes every image.
        cache: decode results of an earlier check; updated with the files decoded now.
        with_masks: annotations need a segmentation (Mask R-CNN training).
    """
    started = time.perf_counter()
    dataset: dict[str, Any] = coco.dataset
    images: list[dict[str, Any]] = dataset["images"]
    annotations: list[dict[str, Any]] = dataset["annotations"]
    report = DataReport(split=split, ann_file=str(ann_file), num_images=len(images), num_annotations=len(annotations))
    names = {int(i["id"]): str(i["file_name"]) for i in images}
    category_ids = {int(c["id"]) for c in dataset["categories"]}

    def bad_annotation(reason: str, ann: dict[str, Any], detail: str) -> None:
        where = names.get(ann.get("image_id"), f"image id {ann.get('image_id')!r}")  # type: ignore[arg-type]
        report.bad_annotations.setdefault(reason, []).append(f"annotation {ann.get('id')} of {where}: {detail}")
        report.excluded_annotation_ids.add(int(ann["id"]))

    usable: dict[int, list[dict[str, Any]]] = {}  # image id -> its annotations that pass the check
    for ann in annotations:
        image_id, category_id = ann.get("image_id"), ann.get("category_id")
        if image_id not in names:
            bad_annotation(UNKNOWN_IMAGE, ann, f"image_id {image_id!r}")
        elif category_id not in category_ids:
            bad_annotation(UNKNOWN_CATEGORY, ann, f"category_id {category_id!r}")
        elif (problem := _bbox_problem(ann.get("bbox"))) is not None:
            bad_annotation(BAD_BOX, ann, problem)
        elif with_masks and not ann.get("iscrowd", 0) and _no_segmentation(ann.get("segmentation")):
            bad_annotation(NO_SEGMENTATION, ann, "empty or missing segmentation")
        else:
            usable.setdefault(int(image_id), []).append(ann)  # type: ignore[arg-type]

    to_decode = images
    if split == "training":
        no_annotations = [i for i in images if int(i["id"]) not in usable]
        too_small = [i for i in images if int(i["id"]) in usable and min(i["width"], i["height"]) < min_size]
        to_decode = [i for i in images if int(i["id"]) in usable and min(i["width"], i["height"]) >= min_size]
        crowd_only = [i for i in to_decode if all(a.get("iscrowd", 0) for a in usable[int(i["id"])])]
        report.filtered = {
            "images without annotations (not trained on)": len(no_annotations),
            f"images with a side under {min_size} px (not trained on)": len(too_small),
            "crowd-only images (trained as background only)": len(crowd_only),
        }
    paths = {int(i["id"]): image_dir / str(i["file_name"]) for i in to_decode}
    checks, report.decoded = decode_all(paths.values(), cache, progress=progress, desc=f"check {split} images")
    report.checked_files = len(paths)
    for info in to_decode:
        image_id = int(info["id"])
        check = checks[paths[image_id]]
        if check is None:
            reason, detail = MISSING, f"not found in {image_dir}"
        elif check.error is not None:
            reason, detail = UNDECODABLE, check.error.replace(str(paths[image_id]), "the file")
        elif check.shape_hw != (info["height"], info["width"]):
            height, width = check.shape_hw or (0, 0)
            reason, detail = SIZE_MISMATCH, f"decodes to {width}x{height}, listed as {info['width']}x{info['height']}"
        else:
            continue
        report.bad_images.setdefault(reason, []).append(f"{info['file_name']}: {detail}")
        report.excluded_image_ids.add(image_id)
    # the dicts keep reasons in a fixed order, whatever the order the items came in
    report.bad_images = {r: report.bad_images[r] for r in IMAGE_REASONS if r in report.bad_images}
    report.bad_annotations = {r: report.bad_annotations[r] for r in ANNOTATION_REASONS if r in report.bad_annotations}
    logger.info(
        "checked the %s data %s: %d image files (%d decoded, %d unchanged since the last check) in %.1f s; %s%s",
        split, ann_file, report.checked_files, report.decoded, report.checked_files - report.decoded,
        time.perf_counter() - started, report.counts(),
        f"; left out by the recipe: {report.filtered_message()}" if report.filtered_message() else "",
    )  # fmt: skip
    return report


def enforce(report: DataReport, *, skip_bad_data: bool) -> None:
    """Raise the report's one-sentence :class:`DatasetError`, or warn when bad data is skipped."""
    if report.ok:
        return
    if not skip_bad_data:
        raise DatasetError(report.error_message())
    logger.warning("%s", report.warning_message())


def without_excluded(coco: COCO, report: DataReport) -> COCO:
    """A copy of ``coco`` without the images and annotations ``report`` excludes (``coco`` if none)."""
    if not report.excluded_image_ids and not report.excluded_annotation_ids:
        return coco
    data = dict(coco.dataset)
    data["images"] = [i for i in data["images"] if int(i["id"]) not in report.excluded_image_ids]
    data["annotations"] = [
        a for a in data["annotations"]
        if int(a["id"]) not in report.excluded_annotation_ids and a.get("image_id") not in report.excluded_image_ids
    ]  # fmt: skip
    if not data["images"]:
        raise DatasetError(f"{report.ann_file} has no usable {report.split} image left: {report.counts()}")
    out = COCO()
    out.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        out.createIndex()
    return out


@dataclass
class CheckedData:
    """A run's annotation files, loaded on every rank and checked on rank 0.

    Attributes:
        train_coco: the training annotations (the dataset applies the exclusions).
        val_coco: the validation annotations without what ``--skip-bad-data`` left out; ``None``
            when the run does not evaluate.
        reports: the training report, then the validation one.
        cache: the decode results to save in the run folder (rank 0; ``None`` elsewhere).
    """

    train_coco: COCO
    val_coco: COCO | None
    reports: list[DataReport]
    cache: DecodeCache | None

    @property
    def train_report(self) -> DataReport:
        return self.reports[0]


def check_run_data(
    cfg: TrainConfig, ctx: DistContext, *, with_masks: bool, evaluate: bool, cache_path: Path
) -> CheckedData:
    """Load a run's annotation files and check them with their images before the first step.

    Rank 0 decodes and checks; every rank gets its reports, or raises the same one-sentence
    :class:`DatasetError` (the check ends in a broadcast that every rank joins, even when rank 0
    failed, so none is left waiting).
    """
    train_ann, train_images = Path(cfg.train_ann), Path(cfg.train_images)
    train_coco = load_coco(train_ann)
    val_coco = None
    if evaluate:
        val_coco = load_eval_coco(Path(cfg.val_ann or ""), Path(cfg.val_images or ""), check_files=False)
    if not train_images.is_dir():
        raise DatasetError(f"no image folder at {train_images}; fix --data/--train-images")
    outcome: tuple[str, Any] = ("ok", None)
    cache = None
    if ctx.is_main:
        try:
            cache = DecodeCache.read(cache_path)
            show = show_progress(ctx)
            reports = [check_dataset(
                train_coco, train_ann, train_images, split="training", cache=cache, with_masks=with_masks,
                min_size=cfg.min_image_size, progress=show,
            )]  # fmt: skip
            if val_coco is not None:
                reports.append(check_dataset(
                    val_coco, Path(cfg.val_ann or ""), Path(cfg.val_images or ""), split="validation", cache=cache,
                    progress=show,
                ))  # fmt: skip
            for report in reports:
                enforce(report, skip_bad_data=cfg.skip_bad_data)
            outcome = ("ok", reports)
        except DatasetError as exc:
            outcome = ("error", str(exc))
        except Exception as exc:  # a bug: rank 0 keeps its traceback, the others stop with its message
            broadcast_from_main(ctx, ("bug", f"{type(exc).__name__}: {exc}"))
            raise
    outcome = broadcast_from_main(ctx, outcome)
    if outcome[0] == "error":
        raise DatasetError(outcome[1])
    if outcome[0] == "bug":
        raise TrainingError(f"the data check failed on rank 0: {outcome[1]}")
    reports = outcome[1]
    if val_coco is not None:
        val_coco = without_excluded(val_coco, reports[1])
    return CheckedData(train_coco=train_coco, val_coco=val_coco, reports=reports, cache=cache)
