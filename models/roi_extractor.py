"""Multi-level RoIAlign as mmdetection's ``SingleRoIExtractor`` does it.

Reference: ``mmdet/models/roi_heads/roi_extractors/single_level_roi_extractor.py`` with mmcv
``RoIAlign(sampling_ratio=0, aligned=True)`` on P2-P5. torchvision's ``MultiScaleRoIAlign``
uses ``aligned=False`` and maps levels with ``floor(4 + log2(s/224) + 1e-6)``; mmdetection maps
with ``floor(log2(s/56 + 1e-6))`` clamped to [0, 3]. The kernel itself is
``torchvision.ops.roi_align(..., aligned=True, sampling_ratio=0)``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import roi_align

ROI_STRIDES = (4, 8, 16, 32)
FINEST_SCALE = 56


def map_roi_levels(rois: torch.Tensor, num_levels: int, finest_scale: int = FINEST_SCALE) -> torch.Tensor:
    """FPN level of each RoI ``(K, 5)`` = ``[batch_idx, x1, y1, x2, y2]``; returns ``(K,)`` int64."""
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


class MultiLevelRoIAlign(nn.Module):
    """Pools ``(K, C, S, S)`` features for RoIs ``(K, 5)`` from FPN maps ``"0".."3"``."""

    def __init__(self, output_size: int, strides: tuple[int, ...] = ROI_STRIDES) -> None:
        super().__init__()
        self.output_size = output_size
        self.strides = strides

    def forward(self, features: dict[str, torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        feats = [features[str(i)] for i in range(len(self.strides))]
        out = feats[0].new_zeros((rois.size(0), feats[0].size(1), self.output_size, self.output_size))
        if rois.numel() == 0:
            return out
        levels = map_roi_levels(rois, len(feats))
        for level, (feat, stride) in enumerate(zip(feats, self.strides, strict=True)):
            inds = torch.nonzero(levels == level, as_tuple=False).squeeze(1)
            if inds.numel() == 0:
                continue
            out[inds] = roi_align(
                feat,
                rois[inds],
                output_size=self.output_size,
                spatial_scale=1.0 / stride,
                sampling_ratio=0,
                aligned=True,
            ).to(out.dtype)
        return out
