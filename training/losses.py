"""Training forward pass and losses of GN+WS Faster/Mask R-CNN.

mmdetection 3.3 references: ``dense_heads/anchor_head.py::loss_by_feat`` (RPN: sigmoid BCE and
L1 on deltas with stds 1, both summed and divided by the number of sampled anchors of the batch),
``dense_heads/rpn_head.py`` (train-time proposals: ``nms_pre=2000, max_per_img=1000``, NMS 0.7),
``roi_heads/bbox_heads/bbox_head.py::loss`` (softmax CE averaged over the sampled RoIs; L1 on
the class-specific deltas of the positives with stds (0.1, 0.1, 0.2, 0.2), summed and divided by
the number of sampled RoIs) and ``roi_heads/mask_heads/fcn_mask_head.py::loss_and_target``
(per-class BCE on 28×28 targets, mean over elements). The class layout is torchvision's:
background at index 0, label ``i`` at ``i + 1``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from models.box_ops import encode_deltas
from models.detector import GNWSDetector
from models.heads import RCNN_STDS, RPN_STDS

from .data import TrainBatch
from .targets import RCNN_SAMPLER, RPN_ASSIGNER, RPN_SAMPLER, assign_and_sample, mask_targets, rcnn_assigner

TRAIN_NMS_PRE = 2000
TRAIN_MAX_PROPOSALS = 1000


def _rois(boxes: list[torch.Tensor]) -> torch.Tensor:
    """``[batch_idx, x1, y1, x2, y2]`` rows for per-image boxes."""
    return torch.cat([torch.cat([b.new_full((b.size(0), 1), float(i)), b], dim=1) for i, b in enumerate(boxes)])


class TrainingModel(nn.Module):
    """Wraps a :class:`GNWSDetector` so that ``forward(batch)`` returns the loss terms (for DDP).

    The detector's own ``forward`` is inference-only; this calls its submodules directly.

    Args:
        detector: the network to train.
        rpn_samples / rcnn_samples: anchors and RoIs sampled per image (mmdetection: 256 and
            512); smaller values only for fast smoke runs on CPU.
    """

    def __init__(self, detector: GNWSDetector, *, rpn_samples: int = 256, rcnn_samples: int = 512) -> None:
        super().__init__()
        self.detector = detector
        self.rcnn_assigner = rcnn_assigner(detector.cfg.has_mask)
        self.rpn_sampler = replace(RPN_SAMPLER, num=rpn_samples)
        self.rcnn_sampler = replace(RCNN_SAMPLER, num=rcnn_samples)

    def forward(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        det = self.detector
        features = det.extract_features(batch.images_nchw)
        levels = list(features.values())
        objectness, deltas = det.rpn(levels)
        anchors = det.rpn.anchors(levels)
        losses = self.rpn_losses(objectness, deltas, anchors, batch)
        with torch.no_grad():
            proposals = det.rpn.predict(
                [o.detach().float() for o in objectness], [d.detach().float() for d in deltas], anchors,
                batch.img_shapes, nms_pre=TRAIN_NMS_PRE, max_per_img=TRAIN_MAX_PROPOSALS,
            )  # fmt: skip
        losses.update(self.rcnn_losses(features, [p[0] for p in proposals], batch))
        return losses

    def rpn_losses(
        self,
        objectness: list[torch.Tensor],
        deltas: list[torch.Tensor],
        anchors: list[torch.Tensor],
        batch: TrainBatch,
    ) -> dict[str, torch.Tensor]:
        all_anchors = torch.cat(anchors)
        cls_terms, reg_terms, num_samples = [], [], 0
        for i, gt in enumerate(batch.boxes):
            obj_i = torch.cat([o[i].permute(1, 2, 0).reshape(-1) for o in objectness]).float()
            dlt_i = torch.cat([d[i].permute(1, 2, 0).reshape(-1, 4) for d in deltas]).float()
            s = assign_and_sample(all_anchors, gt, RPN_ASSIGNER, self.rpn_sampler)
            inds = torch.cat([s.pos_inds, s.neg_inds])
            target = torch.cat([obj_i.new_ones(s.pos_inds.numel()), obj_i.new_zeros(s.neg_inds.numel())])
            cls_terms.append(F.binary_cross_entropy_with_logits(obj_i[inds], target, reduction="sum"))
            reg_target = encode_deltas(all_anchors[s.pos_inds], gt[s.pos_gt_inds], RPN_STDS)
            reg_terms.append((dlt_i[s.pos_inds] - reg_target).abs().sum())
            num_samples += s.num_samples
        avg = max(num_samples, 1)
        return {"loss_rpn_cls": torch.stack(cls_terms).sum() / avg, "loss_rpn_bbox": torch.stack(reg_terms).sum() / avg}

    def rcnn_losses(
        self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor], batch: TrainBatch
    ) -> dict[str, torch.Tensor]:
        det = self.detector
        roi_boxes, labels, reg_targets, pos_boxes, pos_gt, pos_labels = [], [], [], [], [], []
        for i, (props, gt, gt_labels) in enumerate(zip(proposals, batch.boxes, batch.labels, strict=True)):
            s = assign_and_sample(props, gt, self.rcnn_assigner, self.rcnn_sampler)
            pos = s.boxes[s.pos_inds]
            roi_boxes.append(torch.cat([pos, s.boxes[s.neg_inds]]))
            lab = gt_labels[s.pos_gt_inds] + 1
            labels.append(torch.cat([lab, lab.new_zeros(s.neg_inds.numel())]))
            reg_targets.append(encode_deltas(pos, gt[s.pos_gt_inds], RCNN_STDS))
            pos_boxes.append(pos)
            pos_gt.append((i, s.pos_gt_inds))
            pos_labels.append(lab)
        rois = _rois(roi_boxes)
        cls_logits, box_deltas = det.roi_heads.box_forward(features, rois)
        cls_logits, box_deltas = cls_logits.float(), box_deltas.float()
        target_labels = torch.cat(labels)
        num_rois = max(rois.size(0), 1)
        is_pos = target_labels > 0
        pos_deltas = box_deltas.view(box_deltas.size(0), -1, 4)[is_pos, target_labels[is_pos]]
        losses = {
            "loss_cls": F.cross_entropy(cls_logits, target_labels, reduction="sum") / num_rois,
            "loss_bbox": (pos_deltas - torch.cat(reg_targets)).abs().sum() / num_rois,
        }
        with torch.no_grad():
            losses["acc"] = (cls_logits.argmax(dim=1) == target_labels).float().mean() * 100
        if det.cfg.has_mask:
            if batch.masks is None:
                raise ValueError("Mask R-CNN training needs masks in the batch")
            mask_logits = det.roi_heads.mask_forward(features, _rois(pos_boxes)).float()
            all_labels = torch.cat(pos_labels)
            if mask_logits.size(0) == 0:
                losses["loss_mask"] = mask_logits.sum()  # keeps the mask head in the graph (DDP)
            else:
                targets = torch.cat([
                    mask_targets(batch.masks[i], boxes, gt_inds)
                    for (i, gt_inds), boxes in zip(pos_gt, pos_boxes, strict=True)
                ])  # fmt: skip
                chosen = mask_logits[torch.arange(mask_logits.size(0), device=mask_logits.device), all_labels]
                losses["loss_mask"] = F.binary_cross_entropy_with_logits(chosen, targets, reduction="mean")
        return losses


def total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the ``loss_*`` terms (metrics such as ``acc`` excluded)."""
    return sum(
        (v for k, v in losses.items() if k.startswith("loss")),
        torch.zeros((), device=next(iter(losses.values())).device),
    )
