"""Pasting 28x28 mask probabilities into the original image as mmdetection does.

Reference: ``mmdet/models/roi_heads/mask_heads/fcn_mask_head.py`` ``_do_paste_mask``: pixel
centres (``arange + 0.5``) normalised against each box to [-1, 1], then
``F.grid_sample(align_corners=False)`` and ``>= threshold``. torchvision's
``paste_masks_in_image`` (1-pixel expansion + ``interpolate``) gives different masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812


def paste_masks(
    mask_probs: torch.Tensor, boxes_xyxy: torch.Tensor, image_hw: tuple[int, int], threshold: float
) -> torch.Tensor:
    """Paste each ``(N, M, M)`` probability map into its box on an ``(N, H, W)`` bool canvas.

    Each box is pasted over its own bounding region only (mmdetection's CPU ``skip_empty``
    path); values equal a full-image paste.
    """
    img_h, img_w = image_hw
    n = mask_probs.size(0)
    canvas = torch.zeros((n, img_h, img_w), dtype=torch.bool, device=mask_probs.device)
    for i in range(n):
        box = boxes_xyxy[i : i + 1]
        x0_int, y0_int = torch.clamp(box.min(dim=0).values.floor()[:2] - 1, min=0).to(dtype=torch.int32).tolist()
        x1_int = int(torch.clamp(box[:, 2].max().ceil() + 1, max=img_w).item())
        y1_int = int(torch.clamp(box[:, 3].max().ceil() + 1, max=img_h).item())
        if x1_int <= x0_int or y1_int <= y0_int:
            continue
        x0, y0, x1, y1 = torch.split(box, 1, dim=1)
        img_y = torch.arange(y0_int, y1_int, device=box.device).to(torch.float32) + 0.5
        img_x = torch.arange(x0_int, x1_int, device=box.device).to(torch.float32) + 0.5
        img_y = (img_y - y0) / (y1 - y0) * 2 - 1
        img_x = (img_x - x0) / (x1 - x0) * 2 - 1
        img_x = torch.where(torch.isinf(img_x), torch.zeros_like(img_x), img_x)
        img_y = torch.where(torch.isinf(img_y), torch.zeros_like(img_y), img_y)
        gx = img_x[:, None, :].expand(1, img_y.size(1), img_x.size(1))
        gy = img_y[:, :, None].expand(1, img_y.size(1), img_x.size(1))
        grid = torch.stack([gx, gy], dim=3)
        pasted = F.grid_sample(mask_probs[i : i + 1, None].to(torch.float32), grid, align_corners=False)
        canvas[i, y0_int:y1_int, x0_int:x1_int] = pasted[0, 0] >= threshold
    return canvas
