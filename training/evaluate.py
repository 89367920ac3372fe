"""COCO evaluation (bbox, and segm for Mask R-CNN) with pycocotools, as mmdetection's ``CocoMetric``.

Every image of the annotation file is evaluated (no filtering, as mmdetection's test mode),
with the test pipeline (keep-ratio resize, no flip) and the detector's own inference path
(``GNWSDetector.forward``). Under DDP each rank runs a shard; rank 0 gathers the results and
runs ``COCOeval``. Metric names follow mmdetection: ``bbox_mAP``, ``bbox_mAP_50``, ... .
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.distributed as dist
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from models.detector import GNWSDetector
from models.errors import ImageDecodeError
from models.preprocess import decode_image, prepare_image

from .data import load_eval_coco
from .errors import DatasetError, TrainingError

logger = logging.getLogger(__name__)

STAT_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")


@dataclass
class EvalResult:
    """Metrics (``bbox_mAP``...) and the printed COCOeval summaries per IoU type."""

    metrics: dict[str, float] = field(default_factory=dict)
    summaries: dict[str, str] = field(default_factory=dict)
    num_images: int = 0
    num_detections: int = 0


def detections_to_coco(
    image_id: int, result: dict[str, torch.Tensor], category_ids: tuple[int, ...]
) -> list[dict[str, Any]]:
    """One image's detections (boxes xyxy in original pixels) as COCO result entries."""
    boxes = result["boxes"].float().cpu()
    scores = result["scores"].float().cpu().tolist()
    labels = result["labels"].cpu().tolist()
    masks = result.get("masks")
    rles: list[Any] = []
    if masks is not None and len(labels):
        rles = mask_utils.encode(np.asfortranarray(masks.cpu().permute(1, 2, 0).numpy().astype(np.uint8)))
    out = []
    for i, ((x1, y1, x2, y2), score, label) in enumerate(zip(boxes.tolist(), scores, labels, strict=True)):
        entry: dict[str, Any] = {
            "image_id": image_id, "category_id": int(category_ids[label]),
            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score),
        }  # fmt: skip
        if masks is not None:
            entry["segmentation"] = {
                "size": [int(s) for s in rles[i]["size"]],
                "counts": rles[i]["counts"].decode("ascii"),
            }
        out.append(entry)
    return out


def coco_eval(coco_gt: Any, results: list[dict[str, Any]], iou_types: tuple[str, ...]) -> EvalResult:
    """Run ``COCOeval`` for each IoU type; returns metrics and the printed AP tables."""
    out = EvalResult(num_images=len(coco_gt.getImgIds()), num_detections=len(results))
    for iou_type in iou_types:
        if not results:
            out.metrics.update({f"{iou_type}_{n}": 0.0 for n in STAT_NAMES})
            out.summaries[iou_type] = f"no detections: {iou_type} AP is 0.0"
            continue
        entries = (
            [dict(r) for r in results]
            if iou_type == "segm"
            else [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
        )
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            coco_dt = coco_gt.loadRes(entries)
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        summary = "\n".join(line for line in buf.getvalue().splitlines() if "Average" in line)
        out.summaries[iou_type] = summary
        stats = [max(float(s), 0.0) for s in evaluator.stats[:6]]  # -1 (no gt in an area range) -> 0
        out.metrics.update({f"{iou_type}_{n}": round(v, 4) for n, v in zip(STAT_NAMES, stats, strict=True)})
    return out


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate(
    detector: GNWSDetector,
    ann_file: Path,
    image_dir: Path,
    *,
    image_scale: tuple[int, int],
    device: torch.device,
    progress: bool = True,
) -> EvalResult | None:
    """Evaluate ``detector`` on a COCO annotation file; returns the result on rank 0, ``None`` elsewhere.

    Under DDP a failure on one rank (an unreadable image, an out-of-memory error) is shared with
    all ranks before the results are gathered, so every rank raises instead of waiting forever.
    """
    coco_gt = load_eval_coco(ann_file, image_dir)
    cat_ids = set(coco_gt.getCatIds())
    model_ids = detector.cfg.category_ids
    if not set(model_ids) & cat_ids:
        raise DatasetError(
            f"none of the model's category ids {list(model_ids)[:5]}... occur in {ann_file}; "
            "evaluate on data with the categories the model was trained on"
        )
    rank, world = _dist_info()
    image_ids = sorted(coco_gt.getImgIds())
    mine = image_ids[rank::world]
    max_size, min_size = image_scale
    was_training = detector.training
    detector.eval()
    results: list[dict[str, Any]] = []
    failure: Exception | None = None
    try:
        for image_id in tqdm(mine, desc="eval", unit="img", disable=not progress or rank != 0, leave=False):
            info = coco_gt.imgs[image_id]
            path = image_dir / info["file_name"]
            try:
                rgb = decode_image(path)
            except ImageDecodeError as exc:
                raise DatasetError(f"cannot read evaluation image {path}: {exc}") from None
            prepared = prepare_image(rgb, min_size=min_size, max_size=max_size, size_divisor=detector.cfg.size_divisor)
            batch = prepared.image_chw[None].to(device)
            (result,) = detector(batch, [prepared])
            results.extend(detections_to_coco(image_id, result, model_ids))
    except Exception as exc:
        if world == 1:
            raise
        failure = exc  # raised below, once every rank knows
    finally:
        detector.train(was_training)
    if world == 1:
        return coco_eval(coco_gt, results, _iou_types(detector))
    _raise_if_any_rank_failed(failure, rank, world)
    if rank != 0:
        dist.gather_object(results, None, dst=0)
        return None
    gathered: list[list[dict[str, Any]]] = [[] for _ in range(world)]
    dist.gather_object(results, gathered, dst=0)
    return coco_eval(coco_gt, [r for part in gathered for r in part], _iou_types(detector))


def _iou_types(detector: GNWSDetector) -> tuple[str, ...]:
    return ("bbox", "segm") if detector.cfg.has_mask else ("bbox",)


def _raise_if_any_rank_failed(failure: Exception | None, rank: int, world: int) -> None:
    """Collective: every rank learns whether any rank failed; the failed rank re-raises, the others report it."""
    report = None if failure is None else (isinstance(failure, DatasetError), f"{type(failure).__name__}: {failure}")
    reports: list[Any] = [None] * world
    dist.all_gather_object(reports, report)
    if failure is not None:
        raise failure
    failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
    if failed:
        first_rank, (is_dataset, message) = failed[0]
        error = DatasetError if is_dataset else TrainingError
        raise error(f"evaluation failed on rank {first_rank} (of {world}): {message}")


def format_table(result: EvalResult) -> str:
    """The COCOeval AP tables as printed by ``gnws eval``."""
    parts = [f"Evaluated {result.num_images} images, {result.num_detections} detections."]
    for iou_type, summary in result.summaries.items():
        parts.append(f"--- {iou_type} ---\n{summary}")
    metric_line = "  ".join(
        f"{k}={v:.3f}" for k, v in result.metrics.items() if k.endswith(("mAP", "mAP_50", "mAP_75"))
    )
    parts.append(metric_line)
    return "\n".join(parts)
