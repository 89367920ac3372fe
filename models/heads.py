"""RPN and R-CNN heads: torchvision modules, mmdetection's test-time logic.

Modules (and so state-dict keys) are torchvision's: ``RPNHead``, ``FastRCNNConvFCHead``,
``FastRCNNPredictor``, ``MaskRCNNHeads``, ``MaskRCNNPredictor``, with GN and WS convs where
mmdetection's ``Shared4Conv1FCBBoxHead`` / ``FCNMaskHead`` have them. Inference follows
mmdetection's ``RPNHead._predict_by_feat_single``, ``BBoxHead._predict_by_feat_single`` +
``multiclass_nms`` and ``FCNMaskHead._predict_by_feat_single`` (docs/mmdetection-fidelity.md, 'RPN head and
anchors', 'RoI heads' and 'Test-time post-processing'). The class
layout is torchvision's: background at index 0, class ``i`` at ``i + 1``.
"""

from __future__ import annotations

from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead

from .anchors import AnchorGenerator
from .backbone import FPN_CHANNELS, group_norm
from .box_ops import batched_nms, decode_deltas
from .config import DetectorConfig
from .mask_paste import paste_masks
from .roi_extractor import MultiLevelRoIAlign
from .ws_conv import convert_convs_to_ws

RPN_STDS = (1.0, 1.0, 1.0, 1.0)
RCNN_STDS = (0.1, 0.1, 0.2, 0.2)


class ImageMeta(Protocol):
    """What the heads need to know about each image (see ``PreparedImage``)."""

    @property
    def ori_shape(self) -> tuple[int, int]: ...
    @property
    def img_shape(self) -> tuple[int, int]: ...
    @property
    def scale_factor(self) -> tuple[float, float]: ...


class RPN(nn.Module):
    """Shared 3x3 conv + objectness/deltas convs over P2-P6 (no GN, no WS), mmdet anchors."""

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.anchor_generator = AnchorGenerator()
        self.head = RPNHead(FPN_CHANNELS, self.anchor_generator.num_anchors, conv_depth=1)

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: objectness ``(N, A, H, W)`` and deltas ``(N, 4A, H, W)``.

        torchvision's ``RPNHead.forward``, with the shared conv's output cast to the dtype of the
        two 1x1 convs (fp32 islands in the bf16/fp16 modes; a no-op in fp32).
        """
        head = self.head
        objectness, deltas = [], []
        for feature in features:
            t = _cast_for(head.cls_logits, head.conv(feature))
            objectness.append(head.cls_logits(t))
            deltas.append(head.bbox_pred(t))
        return objectness, deltas

    def anchors(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        return self.anchor_generator.grid_anchors(sizes, features[0].device)

    def predict(
        self,
        objectness: list[torch.Tensor],
        deltas: list[torch.Tensor],
        anchors: list[torch.Tensor],
        img_shapes: list[tuple[int, int]],
        *,
        nms_pre: int | None = None,
        max_per_img: int | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Proposals per image: boxes ``(K, 4)`` xyxy in resized pixels and scores ``(K,)``."""
        nms_pre = self.cfg.rpn_nms_pre if nms_pre is None else nms_pre
        max_per_img = self.cfg.rpn_max_per_img if max_per_img is None else max_per_img
        results = []
        for i, img_shape in enumerate(img_shapes):
            level_scores, level_deltas, level_anchors, level_ids = [], [], [], []
            for level, (obj, dlt, anc) in enumerate(zip(objectness, deltas, anchors, strict=True)):
                scores = obj[i].permute(1, 2, 0).reshape(-1).float().sigmoid()  # fp32 from here on
                d = dlt[i].permute(1, 2, 0).reshape(-1, 4).float()
                if 0 < nms_pre < scores.shape[0]:
                    ranked, order = scores.sort(descending=True)
                    top = order[:nms_pre]
                    scores = ranked[:nms_pre]
                    d = d[top]
                    anc = anc[top]
                level_scores.append(scores)
                level_deltas.append(d)
                level_anchors.append(anc)
                level_ids.append(torch.full((scores.numel(),), level, dtype=torch.long, device=scores.device))
            scores = torch.cat(level_scores)
            ids = torch.cat(level_ids)
            boxes = decode_deltas(torch.cat(level_anchors), torch.cat(level_deltas), RPN_STDS, img_shape)
            valid = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
            if not bool(valid.all()):
                boxes, scores, ids = boxes[valid], scores[valid], ids[valid]
            keep = batched_nms(boxes, scores, ids, self.cfg.rpn_nms_iou)[:max_per_img]
            results.append((boxes[keep], scores[keep]))
        return results


class RoIHeads(nn.Module):
    """Shared4Conv1FC box head (+ FCN mask head for Mask R-CNN) with mmdet post-processing."""

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        norm = partial(group_norm, num_groups=cfg.gn_groups)
        num_outputs = cfg.num_classes + 1
        self.box_roi_pool = MultiLevelRoIAlign(7)
        self.box_head = FastRCNNConvFCHead((FPN_CHANNELS, 7, 7), [256] * 4, [1024], norm_layer=norm)
        self.box_predictor = FastRCNNPredictor(1024, num_outputs)
        self.mask_roi_pool: MultiLevelRoIAlign | None = None
        self.mask_head: nn.Module | None = None
        self.mask_predictor: nn.Module | None = None
        if cfg.has_mask:
            self.mask_roi_pool = MultiLevelRoIAlign(14)
            self.mask_head = MaskRCNNHeads(FPN_CHANNELS, [256] * 4, 1, norm_layer=norm)
            self.mask_predictor = MaskRCNNPredictor(256, 256, num_outputs)

    def use_ws(self) -> None:
        """Turn the GN'd convs of the box and mask heads into WS convs (not the predictors)."""
        convert_convs_to_ws(self.box_head)
        if self.mask_head is not None:
            convert_convs_to_ws(self.mask_head)

    def box_forward(self, features: dict[str, torch.Tensor], rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits ``(K, C+1)`` (background 0) and deltas ``(K, 4(C+1))`` for RoIs ``(K, 5)``.

        The outputs are fp32 in every precision mode; each layer group runs in its own dtype.
        """
        x = self.box_head(_cast_for(self.box_head, self.box_roi_pool(features, rois)))
        cls_logits, box_deltas = self.box_predictor(_cast_for(self.box_predictor, x))
        return cls_logits.float(), box_deltas.float()

    def mask_forward(self, features: dict[str, torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """Mask logits ``(K, C+1, 28, 28)`` for RoIs ``(K, 5)``, fp32 in every precision mode."""
        if self.mask_roi_pool is None or self.mask_head is None or self.mask_predictor is None:
            raise RuntimeError("this detector has no mask head")
        x = self.mask_head(_cast_for(self.mask_head, self.mask_roi_pool(features, rois)))
        for layer in self.mask_predictor.children():  # conv5_mask, relu, mask_fcn_logits, each in its dtype
            x = layer(_cast_for(layer, x))
        return x.float()

    def predict(
        self,
        features: dict[str, torch.Tensor],
        proposals: torch.Tensor,
        batch_index: int,
        meta: ImageMeta,
    ) -> dict[str, torch.Tensor]:
        """Final detections of one image in original-image pixels.

        Returns:
            ``boxes`` (N, 4) xyxy, ``scores`` (N,), ``labels`` (N,) in ``0..C-1``, and for Mask
            R-CNN ``masks`` (N, H, W) bool at the original size.
        """
        cfg = self.cfg
        num_classes = cfg.num_classes
        rois = torch.cat([proposals.new_full((proposals.size(0), 1), float(batch_index)), proposals], dim=1)
        cls_logits, box_deltas = self.box_forward(features, rois)
        scores = F.softmax(cls_logits, dim=-1)
        boxes = decode_deltas(proposals, box_deltas[:, 4:], RCNN_STDS, meta.img_shape)
        sx, sy = meta.scale_factor
        if not cfg.has_mask:  # Faster R-CNN rescales in the bbox head (multiplying by 1/scale)
            boxes = boxes * boxes.new_tensor([1 / sx, 1 / sy]).repeat(1, 2).repeat(1, num_classes)
        boxes = boxes.reshape(-1, 4)
        fg_scores = scores[:, 1:].reshape(-1)
        labels = torch.arange(num_classes, device=scores.device).repeat(scores.size(0))
        inds = torch.nonzero(fg_scores > cfg.score_thr, as_tuple=False).squeeze(1)
        boxes, fg_scores, labels = boxes[inds], fg_scores[inds], labels[inds]
        keep = batched_nms(boxes, fg_scores, labels, cfg.nms_iou)[: cfg.max_per_img]
        boxes, fg_scores, labels = boxes[keep], fg_scores[keep], labels[keep]
        result = {"boxes": boxes, "scores": fg_scores, "labels": labels}
        if cfg.has_mask:
            # mask RoIs are the detections in resized coordinates; mmdet then divides in place
            ori_boxes = boxes / boxes.new_tensor([sx, sy]).repeat(1, 2)
            if boxes.numel():
                mask_rois = torch.cat([boxes.new_full((boxes.size(0), 1), float(batch_index)), boxes], dim=1)
                logits = self.mask_forward(features, mask_rois)
                probs = logits[torch.arange(boxes.size(0), device=boxes.device), labels + 1].sigmoid()
            else:
                probs = boxes.new_zeros((0, 28, 28))
            result["boxes"] = ori_boxes
            result["masks"] = paste_masks(probs, ori_boxes, meta.ori_shape, cfg.mask_thr)
        return result


def _cast_for(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype of ``module``'s first parameter, for the bf16/fp16 modes.

    Unchanged for a module without parameters, and under autocast (training with ``--amp``),
    which casts every op's inputs itself; in fp32 mode the cast returns ``x`` itself.
    """
    param = next(module.parameters(), None)
    if param is None or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(param.dtype)
