"""Assigners, samplers and regression/mask targets of the GN+WS recipe.

References (mmdetection 3.3): ``task_modules/assigners/max_iou_assigner.py`` (``MaxIoUAssigner``
with ``gt_max_assign_all=True``), ``task_modules/samplers/random_sampler.py`` (``RandomSampler``,
``add_gt_as_proposals``), ``structures/mask/structures.py::BitmapMasks.crop_and_resize`` and
``roi_heads/mask_heads/fcn_mask_head.py::get_targets``. Settings are those of the Faster and Mask
R-CNN base configs (``configs/_base_/models/faster-rcnn_r50_fpn.py`` and ``mask-rcnn_r50_fpn.py``,
``train_cfg``), which the GN+WS configs do not change: RPN ``MaxIoUAssigner(pos_iou_thr=0.7,
neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True)`` + ``RandomSampler(num=256,
pos_fraction=0.5, add_gt_as_proposals=False)``; R-CNN ``MaxIoUAssigner(0.5, 0.5, 0.5)`` with
``match_low_quality=False`` in the Faster R-CNN base and ``True`` in the Mask R-CNN base +
``RandomSampler(num=512, pos_fraction=0.25, add_gt_as_proposals=True)``. Random choices use the
global torch RNG (saved in checkpoints), like mmdetection's ``randperm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import box_iou, roi_align


@dataclass(frozen=True, kw_only=True)
class AssignerConfig:
    pos_iou_thr: float
    neg_iou_thr: float
    min_pos_iou: float
    match_low_quality: bool


@dataclass(frozen=True, kw_only=True)
class SamplerConfig:
    num: int
    pos_fraction: float
    add_gt_as_proposals: bool


RPN_ASSIGNER = AssignerConfig(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True)
RPN_SAMPLER = SamplerConfig(num=256, pos_fraction=0.5, add_gt_as_proposals=False)
RCNN_SAMPLER = SamplerConfig(num=512, pos_fraction=0.25, add_gt_as_proposals=True)


def rcnn_assigner(has_mask: bool) -> AssignerConfig:
    """Faster R-CNN's base sets ``match_low_quality=False``, Mask R-CNN's ``True``."""
    return AssignerConfig(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=has_mask)


def assign(boxes_xyxy: torch.Tensor, gt_xyxy: torch.Tensor, cfg: AssignerConfig) -> torch.Tensor:
    """``MaxIoUAssigner``: per box ``-1`` ignored, ``0`` negative, ``g + 1`` matched to gt ``g``.

    Args:
        boxes_xyxy: anchors or proposals ``(K, 4)``.
        gt_xyxy: ground-truth boxes ``(G, 4)``.
    """
    num_boxes = boxes_xyxy.size(0)
    if gt_xyxy.numel() == 0:
        return boxes_xyxy.new_zeros((num_boxes,), dtype=torch.long)
    overlaps = box_iou(gt_xyxy.float(), boxes_xyxy.float())  # (G, K)
    assigned = boxes_xyxy.new_full((num_boxes,), -1, dtype=torch.long)
    if num_boxes == 0:
        return assigned
    max_overlaps, argmax = overlaps.max(dim=0)
    gt_max_overlaps, _ = overlaps.max(dim=1)
    assigned[(max_overlaps >= 0) & (max_overlaps < cfg.neg_iou_thr)] = 0
    pos = max_overlaps >= cfg.pos_iou_thr
    assigned[pos] = argmax[pos] + 1
    if cfg.match_low_quality:
        # every gt gets the boxes it overlaps most (all ties), if that overlap is good enough
        for g in range(gt_xyxy.size(0)):
            if gt_max_overlaps[g] >= cfg.min_pos_iou:
                assigned[overlaps[g] == gt_max_overlaps[g]] = g + 1
    return assigned


def _random_choice(indices: torch.Tensor, num: int) -> torch.Tensor:
    if indices.numel() <= num:
        return indices
    perm = torch.randperm(indices.numel())[:num].to(indices.device)
    return indices[perm]


@dataclass(frozen=True)
class Sampled:
    """Result of sampling one image's boxes.

    Attributes:
        boxes: the candidate boxes after gt-as-proposals (``(K', 4)``).
        pos_inds / neg_inds: sampled indices into ``boxes``.
        pos_gt_inds: gt index (0-based) of each positive.
    """

    boxes: torch.Tensor
    pos_inds: torch.Tensor
    neg_inds: torch.Tensor
    pos_gt_inds: torch.Tensor

    @property
    def num_samples(self) -> int:
        return int(self.pos_inds.numel() + self.neg_inds.numel())


def assign_and_sample(
    boxes_xyxy: torch.Tensor, gt_xyxy: torch.Tensor, assigner: AssignerConfig, sampler: SamplerConfig
) -> Sampled:
    """Assign then ``RandomSampler``: at most ``num·pos_fraction`` positives, the rest negatives."""
    assigned = assign(boxes_xyxy, gt_xyxy, assigner)
    if sampler.add_gt_as_proposals and gt_xyxy.numel() > 0:
        boxes_xyxy = torch.cat([gt_xyxy.to(boxes_xyxy.dtype), boxes_xyxy], dim=0)
        gt_inds = torch.arange(1, gt_xyxy.size(0) + 1, device=assigned.device, dtype=torch.long)
        assigned = torch.cat([gt_inds, assigned])
    num_pos = int(sampler.num * sampler.pos_fraction)
    pos_inds = _random_choice(torch.nonzero(assigned > 0, as_tuple=False).squeeze(1), num_pos)
    neg_inds = _random_choice(torch.nonzero(assigned == 0, as_tuple=False).squeeze(1), sampler.num - pos_inds.numel())
    return Sampled(boxes=boxes_xyxy, pos_inds=pos_inds, neg_inds=neg_inds, pos_gt_inds=assigned[pos_inds] - 1)


def mask_targets(
    gt_masks_ghw: torch.Tensor, boxes_xyxy: torch.Tensor, gt_inds: torch.Tensor, size: int = 28
) -> torch.Tensor:
    """``BitmapMasks.crop_and_resize``: RoIAlign each gt mask over its box, binarise at 0.5.

    Args:
        gt_masks_ghw: binary masks of the image in resized (and flipped) pixels.
        boxes_xyxy: positive boxes ``(P, 4)`` in the same pixels.
        gt_inds: gt index of each box.

    Returns:
        ``(P, size, size)`` float targets in {0, 1}.
    """
    if boxes_xyxy.numel() == 0:
        return boxes_xyxy.new_zeros((0, size, size))
    height, width = gt_masks_ghw.shape[-2:]
    boxes_xyxy = boxes_xyxy.clone()  # mmdet mask_target_single clips proposals to the mask size
    boxes_xyxy[:, 0::2] = boxes_xyxy[:, 0::2].clamp(0, width)
    boxes_xyxy[:, 1::2] = boxes_xyxy[:, 1::2].clamp(0, height)
    masks = gt_masks_ghw.index_select(0, gt_inds).to(boxes_xyxy.dtype)[:, None]
    rois = torch.cat(
        [torch.arange(boxes_xyxy.size(0), device=boxes_xyxy.device, dtype=boxes_xyxy.dtype)[:, None], boxes_xyxy], dim=1
    )
    out = roi_align(masks, rois, (size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True).squeeze(1)
    return (out >= 0.5).to(boxes_xyxy.dtype)
