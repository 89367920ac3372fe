"""Box coding and NMS as mmdetection v2/v3 does them.

- ``DeltaXYWHBBoxCoder`` (``mmdet/models/task_modules/coders/delta_xywh_bbox_coder.py``):
  no "+1", deltas multiplied by the stds, dw/dh clamped on both sides to ``|log(16/1000)|``,
  boxes clipped to the resized, unpadded image.
- ``mmcv.ops.batched_nms``: the coordinate-offset trick ``boxes + idx * (max + 1)`` followed by
  one NMS, which ranks and suppresses exactly like mmcv's CPU kernel (IoU > thr, offset 0).
"""

from __future__ import annotations

import math

import torch
from torchvision.ops import nms

WH_RATIO_CLIP = 16 / 1000
MAX_RATIO = abs(math.log(WH_RATIO_CLIP))


def decode_deltas(
    rois_xyxy: torch.Tensor,
    deltas: torch.Tensor,
    stds: tuple[float, float, float, float],
    max_shape: tuple[int, int] | None,
) -> torch.Tensor:
    """Apply ``deltas`` (K, 4·C) to ``rois_xyxy`` (K, 4); returns boxes (K, 4·C).

    Args:
        rois_xyxy: reference boxes.
        deltas: raw regression outputs, ``C`` boxes per row.
        stds: multipliers for (dx, dy, dw, dh); means are zero.
        max_shape: ``(h, w)`` to clip to, or ``None``.
    """
    num_rois = deltas.size(0)
    num_per_roi = deltas.size(1) // 4
    d = deltas.reshape(-1, 4) * deltas.new_tensor(stds).view(1, -1)
    rois = rois_xyxy.repeat(1, num_per_roi).reshape(-1, 4)
    pxy = (rois[:, :2] + rois[:, 2:]) * 0.5
    pwh = rois[:, 2:] - rois[:, :2]
    dxy_wh = pwh * d[:, :2]
    dwh = d[:, 2:].clamp(min=-MAX_RATIO, max=MAX_RATIO)
    gxy = pxy + dxy_wh
    gwh = pwh * dwh.exp()
    boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
    if max_shape is not None:
        boxes[..., 0::2].clamp_(min=0, max=max_shape[1])
        boxes[..., 1::2].clamp_(min=0, max=max_shape[0])
    return boxes.reshape(num_rois, -1)


def encode_deltas(
    proposals_xyxy: torch.Tensor, gt_xyxy: torch.Tensor, stds: tuple[float, float, float, float]
) -> torch.Tensor:
    """Inverse of :func:`decode_deltas` for one box per row (mmdet ``bbox2delta``); (K, 4)."""
    px = (proposals_xyxy[:, 0] + proposals_xyxy[:, 2]) * 0.5
    py = (proposals_xyxy[:, 1] + proposals_xyxy[:, 3]) * 0.5
    pw = proposals_xyxy[:, 2] - proposals_xyxy[:, 0]
    ph = proposals_xyxy[:, 3] - proposals_xyxy[:, 1]
    gx = (gt_xyxy[:, 0] + gt_xyxy[:, 2]) * 0.5
    gy = (gt_xyxy[:, 1] + gt_xyxy[:, 3]) * 0.5
    gw = gt_xyxy[:, 2] - gt_xyxy[:, 0]
    gh = gt_xyxy[:, 3] - gt_xyxy[:, 1]
    deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
    return deltas / deltas.new_tensor(stds).view(1, -1)


def batched_nms(
    boxes_xyxy: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS within each ``idxs`` group; returns kept indices sorted by descending score.

    Uses mmcv's offset trick (the same float arithmetic), not torchvision's per-class loop.
    """
    if boxes_xyxy.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes_xyxy.device)
    max_coordinate = boxes_xyxy.max()
    offsets = idxs.to(boxes_xyxy) * (max_coordinate + torch.tensor(1).to(boxes_xyxy))
    return nms(boxes_xyxy + offsets[:, None], scores, iou_threshold)
