"""Multi-level RoIAlign as mmdetection's ``SingleRoIExtractor`` does it.

Reference: ``mmdet/models/roi_heads/roi_extractors/single_level_roi_extractor.py`` with mmcv
``RoIAlign(sampling_ratio=0, aligned=True)`` on P2-P5. torchvision's ``MultiScaleRoIAlign``
uses ``aligned=False`` and maps levels with ``floor(4 + log2(s/224) + 1e-6)``; mmdetection maps
with ``floor(log2(s/56 + 1e-6))`` clamped to [0, 3]. The kernel itself is
``torchvision.ops.roi_align(..., aligned=True, sampling_ratio=0)``.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch import nn
from torchvision.ops import roi_align

ROI_STRIDES = (4, 8, 16, 32)
FINEST_SCALE = 56
MIN_CHUNK = 32  # RoIs per RoIAlign task at least: below that, a thread hand-off costs more than it saves

_EXECUTORS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_EXECUTORS_LOCK = threading.Lock()


def map_roi_levels(rois: torch.Tensor, num_levels: int, finest_scale: int = FINEST_SCALE) -> torch.Tensor:
    """FPN level of each RoI ``(K, 5)`` = ``[batch_idx, x1, y1, x2, y2]``; returns ``(K,)`` int64."""
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


class _Job(NamedTuple):
    """RoIs ``rois`` (rows ``inds`` of the output) to pool from one fp32 level ``feat``."""

    inds: torch.Tensor
    feat: torch.Tensor
    rois: torch.Tensor
    stride: int

    def split(self, parts: int) -> list[_Job]:
        """Up to ``parts`` jobs of at least ``MIN_CHUNK`` RoIs each (the last may be smaller)."""
        step = max(MIN_CHUNK, -(-len(self.inds) // parts))
        return [
            _Job(self.inds[i : i + step], self.feat, self.rois[i : i + step], self.stride)
            for i in range(0, len(self.inds), step)
        ]


class MultiLevelRoIAlign(nn.Module):
    """Pools ``(K, C, S, S)`` features for RoIs ``(K, 5)`` from FPN maps ``"0".."3"``.

    The sampling coordinates and bilinear weights are fp32 in every precision mode (bf16
    coordinates would be off by up to 4 px at 1000 px); the output has the features' dtype.

    - fp32 features (the exact mode, training, CUDA): ``torchvision.ops.roi_align``, the
      kernel mmdetection's is compared with. Its CPU kernel runs on one thread, so at inference
      on CPU the RoIs are split into chunks pooled on :func:`torch.get_num_threads` threads:
      each output depends on its own RoI only, so the result is bit-for-bit the one-call result.
    - bf16/fp16 channels-last features at inference on CPU (the bf16 mode):
      :func:`roi_align_separable`, the same sampling as matrix products on the features as they
      are, without an fp32 copy of every level (measured at full scale: 78 against 159 ms, a
      sixth of a bf16 forward pass; docs/benchmarks.md, 'Precision modes').
    """

    def __init__(self, output_size: int, strides: tuple[int, ...] = ROI_STRIDES) -> None:
        super().__init__()
        self.output_size = output_size
        self.strides = strides

    def forward(self, features: dict[str, torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        feats = [features[str(i)] for i in range(len(self.strides))]
        size = (rois.size(0), feats[0].size(1), self.output_size, self.output_size)
        separable = _separable(feats[0], rois)
        out = feats[0].new_zeros(size)
        if rois.numel() == 0:
            return out
        levels = map_roi_levels(rois, len(feats))
        if separable:
            out = out.contiguous(memory_format=torch.channels_last)
            pooled_cl = out.permute(0, 2, 3, 1)  # (K, S, S, C) view: filled channels-last
            for level, (feat, stride) in enumerate(zip(feats, self.strides, strict=True)):
                inds = torch.nonzero(levels == level, as_tuple=False).squeeze(1)
                if inds.numel():
                    pooled_cl[inds] = roi_align_separable(feat, rois[inds].float(), 1.0 / stride, self.output_size)
            return out
        jobs: list[_Job] = []
        for level, (feat, stride) in enumerate(zip(feats, self.strides, strict=True)):
            inds = torch.nonzero(levels == level, as_tuple=False).squeeze(1)
            if inds.numel() == 0:
                continue
            jobs.append(_Job(inds, _fp32_nchw(feat), rois[inds].float(), stride))
        threads = torch.get_num_threads()
        if threads > 1 and rois.device.type == "cpu" and not torch.is_grad_enabled() and len(rois) >= 2 * MIN_CHUNK:
            jobs = [chunk for job in jobs for chunk in job.split(threads)]
            pooled = list(_executor(threads).map(self._pool, jobs))
        else:
            pooled = [self._pool(job) for job in jobs]
        for job, result in zip(jobs, pooled, strict=True):
            out[job.inds] = result.to(out.dtype)
        return out

    def _pool(self, job: _Job) -> torch.Tensor:
        return roi_align(
            job.feat,
            job.rois,
            output_size=self.output_size,
            spatial_scale=1.0 / job.stride,
            sampling_ratio=0,
            aligned=True,
        )


def _separable(feat: torch.Tensor, rois: torch.Tensor) -> bool:
    """Whether :func:`roi_align_separable` pools these: reduced-precision channels-last features
    at inference on CPU (the bf16 mode), with RoIs to pool."""
    return (
        feat.dtype in (torch.bfloat16, torch.float16)
        and feat.device.type == "cpu"
        and feat.is_contiguous(memory_format=torch.channels_last)
        and not torch.is_grad_enabled()
        and rois.numel() > 0
    )


SEPARABLE_CHUNK = 32  # RoIs per pair of batched products; a chunk is padded to its largest window
SEPARABLE_PIXELS = 1 << 16  # window pixels gathered per chunk at most (32 MiB of bf16 at 256 channels)


class _AxisSamples(NamedTuple):
    """RoIAlign's sampling along one axis (y or x) of K RoIs: ``(K, S, G)`` per sample point."""

    low: torch.Tensor  # int64 index of the lower neighbour (clamped into the map)
    high: torch.Tensor  # int64 index of the upper neighbour
    w_low: torch.Tensor  # fp32 weight of ``low``, divided by the grid size; 0 for unused samples
    w_high: torch.Tensor  # fp32 weight of ``high``, likewise
    start: torch.Tensor  # (K,) first index any sample touches (its window's start)
    length: torch.Tensor  # (K,) window length: last index touched - start + 1


def _axis_samples(start: torch.Tensor, extent: torch.Tensor, size: int, bins: int) -> _AxisSamples:
    """Sample points and bilinear weights along one axis, as torchvision's ``roi_align``
    (``aligned=True``, ``sampling_ratio=0``) computes them, for every RoI at once.

    Bin ``b`` of a RoI from ``start`` of ``extent`` has ``G = ceil(extent / bins)`` samples at
    ``start + b * extent / bins + (g + 0.5) * extent / bins / G``. A sample outside
    ``[-1, size]`` contributes nothing; inside, it is clamped to ``[0, size - 1]`` and split
    between its two neighbours. Each weight is divided by ``G``: the 2D average over the
    ``Gy * Gx`` samples of a bin is the product of the two axes' averages.
    """
    grid = torch.ceil(extent / bins).long()
    gmax = max(int(grid.max()), 1)
    bin_size = extent / bins
    b = torch.arange(bins, dtype=torch.float32, device=start.device)[None, :, None]
    g = torch.arange(gmax, dtype=torch.float32, device=start.device)[None, None, :]
    grid_f = grid.clamp(min=1).float()[:, None, None]
    pos = start[:, None, None] + b * bin_size[:, None, None] + (g + 0.5) * bin_size[:, None, None] / grid_f
    used = (g < grid[:, None, None]) & (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, 0.0, pos - low)
    w_low = torch.where(used, 1 - frac, 0.0) / grid_f
    w_high = torch.where(used, frac, 0.0) / grid_f
    first = torch.where(used, low, size).amin(dim=(1, 2))
    last = torch.where(used, high, -1).amax(dim=(1, 2))
    first = torch.where(last >= 0, first, 0)  # no sample inside: an empty (all-zero) window of 1
    return _AxisSamples(low, high, w_low, w_high, first, (last - first + 1).clamp(min=1))


def _axis_matrix(axis: _AxisSamples, rows: slice, origin: torch.Tensor, length: int) -> torch.Tensor:
    """``(k, S, length)`` fp32: each bin's weights over the window from ``origin`` (RoIs ``rows``)."""
    k, bins = origin.numel(), axis.low.size(1)
    matrix = torch.zeros((k, bins, length + 1), dtype=torch.float32, device=origin.device)
    for index, weight in ((axis.low[rows], axis.w_low[rows]), (axis.high[rows], axis.w_high[rows])):
        # unused samples have weight 0; their index is sent to the spare last column
        local = torch.where(weight > 0, index - origin[:, None, None], length).clamp(0, length)
        matrix.scatter_add_(2, local, weight)
    return matrix[:, :, :length]


def roi_align_separable(feat: torch.Tensor, rois: torch.Tensor, spatial_scale: float, output_size: int) -> torch.Tensor:
    """RoIAlign (``aligned=True``, adaptive sampling) of channels-last features as matrix products.

    The same sampling as ``torchvision.ops.roi_align`` (:func:`_axis_samples`), computed
    differently: bilinear interpolation at a regular grid of points is separable, so the
    average over a bin's samples is ``Ay[i] · F · Ax[j]ᵀ``, where ``Ay[i]`` holds bin ``i``'s
    weights over the rows of the RoI's window and ``Ax[j]`` bin ``j``'s over its columns. Per
    chunk of RoIs (grouped by window size, padded to the largest), the windows are gathered
    from the ``(N·H·W, C)`` channels-last map and the two contractions are two batched matrix
    products in the features' dtype (oneDNN accumulates bf16 products in fp32). The weights are
    computed in fp32 and rounded to that dtype for the products, as is the intermediate result;
    measured on bf16 features, the output is 2.8e-3 (relative, L2) from torchvision's fp32
    kernel on the same features, where rounding its output to bf16 alone gives 1.7e-3.

    Args:
        feat: ``(N, C, H, W)`` channels-last map of one FPN level.
        rois: ``(K, 5)`` fp32 ``[batch_index, x1, y1, x2, y2]`` in image pixels.
        spatial_scale: 1 / the level's stride.
        output_size: bins per side ``S``.

    Returns:
        ``(K, S, S, C)`` in ``feat``'s dtype (the channels-last layout of ``(K, C, S, S)``).
    """
    n, c, h, w = feat.shape
    flat = feat.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view: the map is channels-last
    box = rois[:, 1:] * spatial_scale - 0.5
    ys = _axis_samples(box[:, 1], box[:, 3] - box[:, 1], h, output_size)
    xs = _axis_samples(box[:, 0], box[:, 2] - box[:, 0], w, output_size)
    # chunks of similar windows: RoIs ordered by the power of two above their window width, then
    # by window height, so that a chunk pads neither far (tall thin and wide flat boxes apart)
    order = torch.argsort(torch.ceil(torch.log2(xs.length.float())).long() * (h + 2) + ys.length)
    ys = _AxisSamples(*(t[order] for t in ys))
    xs = _AxisSamples(*(t[order] for t in xs))
    base = rois[order, 0].long() * (h * w)
    heights, widths = ys.length.tolist(), xs.length.tolist()
    width_class = torch.ceil(torch.log2(xs.length.float())).long()
    breaks = (torch.nonzero(width_class[1:] != width_class[:-1]).flatten() + 1).tolist()
    out = feat.new_empty((rois.size(0), output_size, output_size, c))
    for first, end in zip([0, *breaks], [*breaks, rois.size(0)], strict=True):
        a = first
        while a < end:
            rows = slice(a, min(a + SEPARABLE_CHUNK, end))
            win_h, win_w = max(heights[rows]), max(widths[rows])
            if (rows.stop - a) * win_h * win_w > SEPARABLE_PIXELS:  # few large windows: fewer RoIs
                rows = slice(a, a + max(1, SEPARABLE_PIXELS // (win_h * win_w)))
                win_h, win_w = max(heights[rows]), max(widths[rows])
            a = rows.stop
            # windows moved inside the map where padding would cross its edge (their weights follow)
            y0 = ys.start[rows].clamp(max=max(h - win_h, 0))
            x0 = xs.start[rows].clamp(max=max(w - win_w, 0))
            ay = _axis_matrix(ys, rows, y0, win_h).to(feat.dtype)
            ax = _axis_matrix(xs, rows, x0, win_w).to(feat.dtype)
            row_idx = (y0[:, None] + torch.arange(win_h, device=feat.device)).clamp(max=h - 1)
            col_idx = (x0[:, None] + torch.arange(win_w, device=feat.device)).clamp(max=w - 1)
            # windows gathered column by column, (k, win_w, win_h * C): columns contract first
            index = base[rows, None, None] + col_idx[:, :, None] + row_idx[:, None, :] * w
            windows = flat.index_select(0, index.reshape(-1)).view(-1, win_w, win_h * c)
            by_column = torch.bmm(ax, windows).view(-1, output_size, win_h, c)  # (k, j, rows, C)
            pooled = torch.matmul(ay[:, None], by_column)  # (k, j, i, C)
            out[order[rows]] = pooled.transpose(1, 2)
    return out


def _fp32_nchw(feat: torch.Tensor) -> torch.Tensor:
    """``feat`` as contiguous fp32 (the kernel's layout): itself in fp32 mode, else one cast.

    A channels-last map of one image is an ``(H·W, C)`` matrix in memory; transposing it as a 2D
    matrix in bf16 (PyTorch's blocked transpose) and then casting is ~3x faster than a strided
    4D copy that transposes and casts at once (measured on P2 at full scale: 47 vs 127 ms).
    """
    if feat.dtype == torch.float32 and feat.is_contiguous():
        return feat
    n, c, h, w = feat.shape
    if n == 1 and feat.is_contiguous(memory_format=torch.channels_last):
        feat = feat.permute(0, 2, 3, 1).reshape(h * w, c).t().contiguous().view(1, c, h, w)
    return feat.to(torch.float32, memory_format=torch.contiguous_format)


def _executor(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``threads`` RoIAlign threads (made on first use; idle otherwise).

    Keyed by process id too: a forked child has none of its parent's threads, and a pool it
    inherited would queue work that no thread runs.
    """
    key = (os.getpid(), threads)
    with _EXECUTORS_LOCK:
        executor = _EXECUTORS.get(key)
        if executor is None:
            executor = _EXECUTORS[key] = ThreadPoolExecutor(threads, thread_name_prefix="gnws-roi-align")
        return executor
