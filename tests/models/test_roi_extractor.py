"""RoIAlign: split over threads, bit for bit the one-call result (fp32); as matrix products on
channels-last bf16 features, torchvision's sampling to float rounding."""

from __future__ import annotations

import sys

import pytest
import torch
from torchvision.ops import roi_align

from models import roi_extractor
from models.roi_extractor import MultiLevelRoIAlign, _fp32_nchw, roi_align_separable


def _features_and_rois(dtype: torch.dtype, channels_last: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    feats = {str(i): torch.randn(1, 16, 96 >> i, 128 >> i, generator=g).to(dtype) for i in range(4)}
    if channels_last:
        feats = {k: v.contiguous(memory_format=torch.channels_last) for k, v in feats.items()}
    xy = torch.rand(300, 2, generator=g) * torch.tensor([480.0, 350.0])
    wh = torch.rand(300, 2, generator=g) ** 3 * 800 + 1  # mostly small boxes, some large: all 4 levels
    return feats, torch.cat([torch.zeros(300, 1), xy, xy + wh], dim=1)


@pytest.mark.parametrize(("dtype", "channels_last"), [(torch.float32, False), (torch.float32, True)])
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


def _awkward_rois(n: int, size: tuple[float, float], batch: int) -> torch.Tensor:
    """RoIs of every kind the sampling has a branch for: inside, across and beyond the map's edges,
    tall and thin, wide and flat, zero and negative sizes, on each image of the batch."""
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(n, 2, generator=g) * torch.tensor(size) * 1.2 - 20
    wh = torch.rand(n, 2, generator=g) ** 3 * torch.tensor(size) - 2
    wh[: n // 8, 0] = 3  # tall and thin
    wh[n // 8 : n // 4, 1] = 3  # wide and flat
    rois = torch.cat([torch.randint(0, batch, (n, 1), generator=g).float(), xy, xy + wh], dim=1)
    rois[-5:, 3:] = rois[-5:, 1:3]  # zero size
    return rois


@pytest.mark.parametrize("budget", [roi_extractor.SEPARABLE_PIXELS, 50])
@pytest.mark.parametrize("spatial_scale", [1 / 4, 1 / 32])
def test_separable_samples_as_torchvision(monkeypatch: pytest.MonkeyPatch, spatial_scale: float, budget: int) -> None:
    """In fp32 the matrix-product RoIAlign is torchvision's kernel to float rounding, however the
    RoIs are chunked (a small pixel budget: chunks of one RoI where windows are large)."""
    monkeypatch.setattr(roi_extractor, "SEPARABLE_PIXELS", budget)
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 16, 50, 70, generator=g)
    rois = _awkward_rois(400, (70 / spatial_scale, 50 / spatial_scale), batch=2)
    expected = roi_align(feat, rois, 7, spatial_scale, sampling_ratio=0, aligned=True)
    got = roi_align_separable(feat.contiguous(memory_format=torch.channels_last), rois, spatial_scale, 7)
    assert got.shape == (400, 7, 7, 16)
    torch.testing.assert_close(got.permute(0, 3, 1, 2), expected, rtol=0, atol=1e-5)
    assert expected[-5:].abs().max() == 0
    assert got[-5:].abs().max() == 0


def test_bf16_pools_channels_last_close_to_fp32_roi_align() -> None:
    """The bf16 mode's path: channels-last output, 5e-3 (relative, L2) of torchvision in fp32 on the
    same bf16 features (rounding the output to bf16 alone gives about 1.7e-3)."""
    feats, rois = _features_and_rois(torch.bfloat16, channels_last=True)
    with torch.inference_mode():
        got = MultiLevelRoIAlign(7)(feats, rois)
        expected = MultiLevelRoIAlign(7)({k: v.float().contiguous() for k, v in feats.items()}, rois)
    assert got.dtype == torch.bfloat16
    assert got.is_contiguous(memory_format=torch.channels_last)
    error = float((got.float() - expected).norm() / expected.norm())
    assert error < 5e-3, error
