"""mmdetection's ``AnchorGenerator`` for the FPN RPN (strides 4-64, ratios 0.5/1/2, scale 8).

Reference: ``mmdet/models/task_modules/prior_generators/anchor_generator.py``. Unlike
torchvision's ``AnchorGenerator`` the base anchors are not rounded, the strides are fixed (not
inferred from padded/feature size, which gives a wrong P6 stride), and there is no centre offset.
"""

from __future__ import annotations

import torch

RPN_STRIDES = (4, 8, 16, 32, 64)
RPN_RATIOS = (0.5, 1.0, 2.0)
RPN_SCALES = (8.0,)


class AnchorGenerator:
    """Anchors per FPN level in (y, x, anchor) row-major order, xyxy in input pixels."""

    def __init__(
        self,
        strides: tuple[int, ...] = RPN_STRIDES,
        ratios: tuple[float, ...] = RPN_RATIOS,
        scales: tuple[float, ...] = RPN_SCALES,
    ) -> None:
        self.strides = strides
        self.ratios = ratios
        self.scales = scales
        self._cache: dict[tuple[object, ...], list[torch.Tensor]] = {}

    @property
    def num_anchors(self) -> int:
        return len(self.ratios) * len(self.scales)

    def base_anchors(self, stride: int, device: torch.device) -> torch.Tensor:
        """(A, 4) anchors centred on (0, 0), ratio-major (scale_major=True in mmdet)."""
        base = float(stride)
        ratios = torch.tensor(self.ratios, device=device)
        scales = torch.tensor(self.scales, device=device)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (base * w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (base * h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)

    def grid_anchors(self, feature_sizes: list[tuple[int, int]], device: torch.device) -> list[torch.Tensor]:
        """Anchors for each level, each ``(H·W·A, 4)``; row index ``(y·W + x)·A + a``."""
        key = (tuple(feature_sizes), str(device))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        out = []
        for (h, w), stride in zip(feature_sizes, self.strides, strict=True):
            base = self.base_anchors(stride, device)
            shift_x = torch.arange(0, w, device=device) * stride
            shift_y = torch.arange(0, h, device=device) * stride
            xx = shift_x.repeat(len(shift_y))
            yy = shift_y.view(-1, 1).repeat(1, len(shift_x)).view(-1)
            shifts = torch.stack([xx, yy, xx, yy], dim=-1).to(base.dtype)
            out.append((base[None, :, :] + shifts[:, None, :]).view(-1, 4))
        if len(self._cache) > 32:
            self._cache.clear()
        self._cache[key] = out
        return out
