"""MaxIoUAssigner, RandomSampler and mask targets against hand-worked cases."""

from __future__ import annotations

import torch

from training.targets import (
    RCNN_SAMPLER,
    RPN_ASSIGNER,
    AssignerConfig,
    SamplerConfig,
    assign,
    assign_and_sample,
    mask_targets,
    rcnn_assigner,
)

GT = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0]])


def test_max_iou_assigner_thresholds() -> None:
    boxes = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],  # IoU 1 with gt 0 -> positive
        [0.0, 0.0, 10.0, 5.0],  # IoU 0.5 with gt 0 -> between neg 0.3 and pos 0.7: ignored
        [100.0, 100.0, 110.0, 110.0],  # IoU 0 -> negative
        [20.0, 20.0, 40.0, 31.0],  # IoU 0.55 with gt 1: best for gt 1 -> low-quality positive
    ])  # fmt: skip
    assert assign(boxes, GT, RPN_ASSIGNER).tolist() == [1, -1, 0, 2]
    no_low = AssignerConfig(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=False)
    assert assign(boxes, GT, no_low).tolist() == [1, -1, 0, -1]
    # R-CNN: one threshold 0.5; Faster (no low-quality) vs Mask (low-quality)
    assert assign(boxes, GT, rcnn_assigner(False)).tolist() == [1, 1, 0, 2]
    assert assign(boxes, torch.zeros((0, 4)), RPN_ASSIGNER).tolist() == [0, 0, 0, 0]


def test_low_quality_match_assigns_all_ties() -> None:
    boxes = torch.tensor([[20.0, 20.0, 30.0, 40.0], [30.0, 20.0, 40.0, 40.0], [0.0, 0.0, 1.0, 1.0]])
    assert assign(boxes, GT[1:], RPN_ASSIGNER).tolist() == [1, 1, 0]


def test_random_sampler_caps_positives_and_adds_gt() -> None:
    torch.manual_seed(0)
    proposals = torch.cat([GT[0:1].repeat(300, 1), torch.tensor([[200.0, 200.0, 210.0, 210.0]]).repeat(1000, 1)])
    s = assign_and_sample(proposals, GT, rcnn_assigner(True), RCNN_SAMPLER)
    assert s.boxes.shape[0] == 1302  # two gt boxes prepended
    assert s.pos_inds.numel() == 128  # 512 * 0.25
    assert s.neg_inds.numel() == 512 - 128
    assert set(s.pos_gt_inds.tolist()) <= {0, 1}
    few = assign_and_sample(proposals[:3], GT, rcnn_assigner(False), SamplerConfig(num=8, pos_fraction=0.5,
                                                                                   add_gt_as_proposals=True))
    assert few.pos_inds.numel() == 4  # 2 gt + 3 matching proposals, capped at 8 * 0.5
    assert few.neg_inds.numel() == 0


def test_mask_targets_crop_and_resize() -> None:
    masks = torch.zeros((2, 40, 40), dtype=torch.uint8)
    masks[0, :, :20] = 1  # left half of the image
    masks[1, 10:30, 10:30] = 1
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [10.0, 10.0, 30.0, 30.0]])
    t = mask_targets(masks, boxes, torch.tensor([0, 1]), size=28)
    assert t.shape == (2, 28, 28)
    assert t[0, :, :14].eq(1).all()
    assert t[0, :, 14:].eq(0).all()
    assert t[1].eq(1).all()
    assert mask_targets(masks, boxes[:0], torch.tensor([], dtype=torch.long)).shape == (0, 28, 28)
