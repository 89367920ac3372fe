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

    RoIAlign runs in fp32 in every precision mode (torchvision has no bf16 CPU kernel, and bf16
    coordinates would be off by up to 4 px at 1000 px); the output has the features' dtype.
    torchvision's CPU kernel runs on one thread, so at inference on CPU the RoIs are split into
    chunks pooled on :func:`torch.get_num_threads` threads: each output depends on its own RoI
    only, so the result is bit-for-bit the one-call result (measured: RoIAlign was a quarter of
    a bf16 forward pass on 2 cores).
    """

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
