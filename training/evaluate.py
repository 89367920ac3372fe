"""COCO evaluation (bbox, and segm for Mask R-CNN) with pycocotools, as mmdetection's ``CocoMetric``.

Every image of the annotation file is evaluated (no filtering, as mmdetection's test mode),
with the test pipeline (keep-ratio resize, no flip) and the detector's own inference path
(``GNWSDetector.forward``). Under DDP each rank runs a shard; rank 0 gathers the results and
runs ``COCOeval``. Metric names follow mmdetection: ``bbox_mAP``, ``bbox_mAP_50``, ... . The AP of
each category is read from COCOeval's accumulated precision array (IoU 0.50:0.95, all areas, 100
detections; the mean over the recall thresholds and IoUs where it is defined), as detectron2's
``COCOEvaluator._derive_coco_results`` does.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from models.detector import GNWSDetector
from models.draw import draw_detections
from models.errors import ImageDecodeError
from models.predictor import Detection
from models.preprocess import decode_image, prepare_image

from .data import load_eval_coco
from .errors import DatasetError, TrainingError
from .runtime import first_failure

logger = logging.getLogger(__name__)

STAT_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")


@dataclass
class EvalResult:
    """Metrics (``bbox_mAP``...), the printed COCOeval summaries and per-category AP per IoU type.

    Attributes:
        per_class: IoU type → ``[(category name, AP)]`` in category id order; AP is ``nan`` for
            a category without ground truth in the evaluated set.
        results: every detection in COCO results format (``bbox`` xywh, ``segmentation`` RLE with
            ``counts`` as text), all ranks' on rank 0.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    summaries: dict[str, str] = field(default_factory=dict)
    per_class: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    num_images: int = 0
    num_detections: int = 0
    results: list[dict[str, Any]] = field(default_factory=list)


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
    """Run ``COCOeval`` for each IoU type; returns metrics, the printed AP tables and per-category AP."""
    out = EvalResult(num_images=len(coco_gt.getImgIds()), num_detections=len(results), results=results)
    for iou_type in iou_types:
        if not results:
            out.metrics.update({f"{iou_type}_{n}": 0.0 for n in STAT_NAMES})
            out.summaries[iou_type] = f"no detections: {iou_type} AP is 0.0"
            out.per_class[iou_type] = [(c["name"], 0.0) for c in _categories(coco_gt)]
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
        out.per_class[iou_type] = per_category_ap(evaluator, coco_gt)
    return out


def _categories(coco_gt: Any) -> list[dict[str, Any]]:
    return [coco_gt.cats[c] for c in sorted(coco_gt.getCatIds())]


def per_category_ap(evaluator: COCOeval, coco_gt: Any) -> list[tuple[str, float]]:
    """``[(name, AP)]`` from an accumulated evaluator: precision ``[T, R, K, A, M]`` at area "all", 100 dets.

    The AP of category ``k`` is the mean of ``precision[:, :, k, 0, -1]`` over the entries that are
    defined (``> -1``); ``nan`` when none is (no ground truth of ``k``).
    """
    precision = evaluator.eval["precision"]
    out = []
    for k, cat_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        out.append((str(coco_gt.cats[cat_id]["name"]), float(np.mean(values)) if values.size else float("nan")))
    return out


def format_per_class(result: EvalResult, iou_type: str, *, columns: int = 3) -> str:
    """Per-category AP (in %) as a table of ``columns`` (category, AP) pairs, like detectron2 prints it.

    Categories without ground truth in the evaluated set are left out (and counted below the table).
    """
    rows = result.per_class.get(iou_type, [])
    known = [(name, ap) for name, ap in rows if not math.isnan(ap)]
    if not known:
        return f"per-category {iou_type} AP: no category has ground truth in this set"
    width = max(len("category"), *(len(name) for name, _ in known))
    cells = [f"{name:<{width}}  {100 * ap:6.2f}" for name, ap in known]
    header = "   ".join([f"{'category':<{width}}  {'AP':>6}"] * min(columns, len(cells)))
    lines = [f"per-category {iou_type} AP:", header]
    lines += ["   ".join(cells[i : i + columns]) for i in range(0, len(cells), columns)]
    left_out = len(rows) - len(known)
    if left_out:
        lines.append(f"({left_out} categories without ground truth in this set not shown)")
    return "\n".join(lines)


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
    coco_gt: COCO | None = None,
) -> EvalResult | None:
    """Evaluate ``detector`` on a COCO annotation file; returns the result on rank 0, ``None`` elsewhere.

    Under DDP a failure on one rank (an unreadable image, an out-of-memory error) is shared with
    all ranks before the results are gathered, so every rank raises instead of waiting forever.

    Args:
        coco_gt: ``ann_file`` already loaded and checked (training passes its data-checked copy,
            without what ``--skip-bad-data`` left out); loaded and checked here when ``None``.
    """
    if coco_gt is None:
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
        show = progress and rank == 0 and sys.stderr.isatty()  # no progress-bar lines in a log file
        for image_id in tqdm(mine, desc="eval", unit="img", disable=not show, leave=False):
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
    _raise_if_any_rank_failed(failure, world, device)
    if rank != 0:
        dist.gather_object(results, None, dst=0)
        return None
    gathered: list[list[dict[str, Any]]] = [[] for _ in range(world)]
    dist.gather_object(results, gathered, dst=0)
    return coco_eval(coco_gt, [r for part in gathered for r in part], _iou_types(detector))


def _iou_types(detector: GNWSDetector) -> tuple[str, ...]:
    return ("bbox", "segm") if detector.cfg.has_mask else ("bbox",)


def _raise_if_any_rank_failed(failure: Exception | None, world: int, device: torch.device) -> None:
    """Collective: every rank learns whether any rank failed; the failed rank re-raises, the others report it."""
    report = None if failure is None else (isinstance(failure, DatasetError), f"{type(failure).__name__}: {failure}")
    first = first_failure(report, device)
    if failure is not None:
        raise failure
    if first is not None:
        first_rank, (is_dataset, message) = first
        error = DatasetError if is_dataset else TrainingError
        raise error(f"evaluation failed on rank {first_rank} (of {world}): {message}")


def draw_evaluation(
    result: EvalResult,
    coco_gt: COCO,
    image_dir: Path,
    out_dir: Path,
    *,
    names: dict[int, str],
    score_threshold: float,
) -> int:
    """Draw each evaluated image's detections (score >= ``score_threshold``) into ``out_dir``.

    Files keep the image's file name (its folders dropped); returns how many were written.

    Args:
        names: category id → name, for the labels.
    """
    by_image: dict[int, list[Detection]] = {int(i): [] for i in coco_gt.getImgIds()}
    for r in result.results:
        if r["score"] < score_threshold:
            continue
        x, y, w, h = r["bbox"]
        det: Detection = {
            "bbox": r["bbox"], "bbox_xyxy": [x, y, x + w, y + h], "score": r["score"],
            "category_id": r["category_id"], "category_name": names.get(r["category_id"], str(r["category_id"])),
        }  # fmt: skip
        if "segmentation" in r:
            det["segmentation"] = r["segmentation"]
        by_image.setdefault(int(r["image_id"]), []).append(det)
    written = 0
    for image_id, dets in tqdm(sorted(by_image.items()), desc="draw", unit="img", disable=not sys.stderr.isatty()):
        name = Path(coco_gt.imgs[image_id]["file_name"]).name
        try:
            rgb = decode_image(image_dir / coco_gt.imgs[image_id]["file_name"])
        except ImageDecodeError as exc:
            logger.warning("not drawn: %s", exc)
            continue
        draw_detections(rgb, dets).save(out_dir / name)
        written += 1
    return written


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
