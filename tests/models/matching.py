"""The comparison rule of ``shared/reference/README.md`` for detections vs mmdetection's."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_utils


def box_iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def decode_rle(rle: dict) -> np.ndarray:
    counts = rle["counts"]
    return mask_utils.decode({"size": rle["size"], "counts": counts.encode() if isinstance(counts, str) else counts})


@dataclass
class MatchReport:
    matched: int
    n_ref: int
    n_ours: int
    min_iou: float
    max_score_diff: float
    max_mask_xor_excess: int  # XOR pixels above the allowance (0 when every mask passes)
    mask_failures: int

    def passes(self) -> bool:
        allow_ref = max(1, int(0.01 * self.n_ref))
        allow_ours = max(1, int(0.01 * self.n_ours))
        return (
            self.n_ref - self.matched <= allow_ref
            and self.n_ours - self.matched <= allow_ours
            and self.mask_failures == 0
        )


def match_detections(ref: dict, ours: list[dict]) -> MatchReport:
    """Greedy matching in descending reference score order: same label, IoU >= 0.99 or all four
    coordinates within 0.05 px, |score diff| <= 1e-3; best IoU among candidates."""
    used = [False] * len(ours)
    order = sorted(range(len(ref["scores"])), key=lambda i: -ref["scores"][i])
    matched, min_iou, max_ds, mask_failures, xor_excess = 0, 1.0, 0.0, 0, 0
    for i in order:
        rb, rs, rc = ref["bboxes"][i], ref["scores"][i], ref["category_ids"][i]
        best, best_iou = -1, -1.0
        for j, d in enumerate(ours):
            if used[j] or d["category_id"] != rc or abs(d["score"] - rs) > 1e-3:
                continue
            iou = box_iou(rb, d["bbox_xyxy"])
            close = all(abs(x - y) <= 0.05 for x, y in zip(rb, d["bbox_xyxy"], strict=True))
            if (iou >= 0.99 or close) and iou > best_iou:
                best, best_iou = j, iou
        if best < 0:
            continue
        used[best] = True
        matched += 1
        min_iou = min(min_iou, best_iou)
        max_ds = max(max_ds, abs(ours[best]["score"] - rs))
        if "masks" in ref:
            a, b = decode_rle(ref["masks"][i]).astype(bool), decode_rle(ours[best]["segmentation"]).astype(bool)
            xor = int((a ^ b).sum())
            allowed = max(2, int(0.02 * int((a | b).sum())))
            if xor > allowed:
                mask_failures += 1
                xor_excess = max(xor_excess, xor - allowed)
    return MatchReport(matched, len(order), len(ours), min_iou, max_ds, xor_excess, mask_failures)
