"""RoIAlign split over threads returns bit for bit the one-call result, in every precision mode."""

from __future__ import annotations

import sys

import pytest
import torch

from models import roi_extractor
from models.roi_extractor import MultiLevelRoIAlign, _fp32_nchw


def _features_and_rois(dtype: torch.dtype, channels_last: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    feats = {str(i): torch.randn(1, 16, 96 >> i, 128 >> i, generator=g).to(dtype) for i in range(4)}
    if channels_last:
        feats = {k: v.contiguous(memory_format=torch.channels_last) for k, v in feats.items()}
    xy = torch.rand(300, 2, generator=g) * torch.tensor([480.0, 350.0])
    wh = torch.rand(300, 2, generator=g) ** 3 * 800 + 1  # mostly small boxes, some large: all 4 levels
    return feats, torch.cat([torch.zeros(300, 1), xy, xy + wh], dim=1)


@pytest.mark.parametrize(("dtype", "channels_last"), [(torch.float32, False), (torch.bfloat16, True)])
def test_threads_equal_one_call(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, channels_last: bool) -> None:
    assert torch.get_num_threads() == 2  # tests/conftest.py
    feats, rois = _features_and_rois(dtype, channels_last)
    pool = MultiLevelRoIAlign(7)
    assert len(set(roi_extractor.map_roi_levels(rois, 4).tolist())) == 4
    with torch.inference_mode():
        split = pool(feats, rois)
        monkeypatch.setattr(roi_extractor, "MIN_CHUNK", sys.maxsize)  # one roi_align call per level
        whole = pool(feats, rois)
    assert split.dtype == dtype
    assert torch.equal(split, whole)


def test_fp32_nchw_is_a_no_op_in_fp32_and_exact_for_channels_last_bf16() -> None:
    fp32 = torch.randn(1, 16, 24, 40)
    assert _fp32_nchw(fp32) is fp32
    bf16 = torch.randn(1, 16, 24, 40).bfloat16().contiguous(memory_format=torch.channels_last)
    out = _fp32_nchw(bf16)
    assert out.dtype == torch.float32
    assert out.is_contiguous()
    assert torch.equal(out, bf16.float())
