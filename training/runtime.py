"""Process-level plumbing of a training run: torch.distributed setup, seeding, replica digests, metrics sink.

Distributed jobs are launched by torchrun, which sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
NCCL is used on CUDA devices and gloo on CPU. Metrics go to ``metrics.jsonl`` (one JSON object per
line, appended) and TensorBoard (``tb/``), from rank 0 only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from models.predictor import resolve_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str) -> DistContext:
    """Join the torchrun job if there is one (``WORLD_SIZE`` > 1); NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None
        )
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names and float32 values, to check that DDP replicas agree."""
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class MetricsLog:
    """Rank-0 sink: ``metrics.jsonl`` (appended, one JSON object per line) and TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer: Any = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning(
                    "tensorboard is not installed (pip install 'gnws[train]'); logging to metrics.jsonl only"
                )
            else:
                self.writer = SummaryWriter(str(run_dir / "tb"))

    def write(self, record: dict[str, Any], step: int, prefix: str) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k not in ("iter", "epoch"):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
