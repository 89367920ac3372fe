"""Process-level plumbing of a training run: torch.distributed setup, seeding, collective failures,
replica digests, the metrics sink and the speed/memory meter.

Distributed jobs are launched by torchrun, which sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
NCCL is used on CUDA devices and gloo on CPU. A failure on one rank (an unreadable image, diverged
replicas) is shared with every rank through a collective before anyone waits in the next one
(:func:`first_failure`), so a job stops everywhere with the same message instead of hanging.
Metrics go to ``metrics.jsonl`` (one JSON object per line, appended) and TensorBoard (``tb/``),
from rank 0 only. Progress bars are drawn only on a terminal: a log file gets plain lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import resource
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from models.files import atomic_write_bytes
from models.predictor import resolve_device

from .errors import TrainingError

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


def broadcast_from_main(ctx: DistContext, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (``value`` itself in a one-process run)."""
    if not ctx.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_failure(failure: Any | None, device: torch.device) -> tuple[int, Any] | None:
    """Collective: ``(rank, failure)`` of the lowest rank that reports one, the same on every rank.

    Every rank of the default process group must call it at the same point, with ``None`` when it
    is fine. It costs one small all-reduce when no rank failed (the failures themselves are only
    gathered when one did). Without a process group it returns this process's own failure.

    Args:
        failure: any picklable description of what went wrong here, or ``None``.
        device: this rank's device (NCCL reduces CUDA tensors only).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None if failure is None else (0, failure)
    flag = torch.tensor([0 if failure is None else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag)
    if int(flag.item()) == 0:
        return None
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, failure)
    return next((rank, report) for rank, report in enumerate(reports) if report is not None)


def show_progress(ctx: DistContext) -> bool:
    """Progress bars on rank 0 when stderr is a terminal; a log file gets no ``\\r`` bar lines."""
    return ctx.is_main and sys.stderr.isatty()


def rss_mib() -> float:
    """Resident memory of this process in MiB (``/proc/self/statm``; the peak where that is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def gather_replica_states(ctx: DistContext, rng: Any, digest: str, iteration: int) -> tuple[list[Any], list[str]]:
    """Every rank's RNG state and weight digest; raises on *every* rank when the replicas differ.

    The check runs on all ranks (they all receive every digest), so a divergence stops the whole
    job instead of rank 0 alone while the others wait in the next collective.
    """
    rngs, digests = [rng], [digest]
    if ctx.distributed:
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, (rng, digest))
        rngs, digests = [g[0] for g in gathered], [g[1] for g in gathered]
    if len(set(digests)) != 1:
        raise TrainingError(
            f"DDP replicas diverged at iteration {iteration}: weight digests per rank {digests}; "
            "this is a bug or a broken device, resume from the last checkpoint"
        )
    return rngs, digests


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names and float32 values, to check that DDP replicas agree."""
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class MetricsLog:
    """Rank-0 sink: ``metrics.jsonl`` (appended, one JSON object per line) and TensorBoard."""

    def __init__(
        self, run_dir: Path, enabled: bool, tensorboard: bool, *, resume_iteration: int | None = None,
        redo_eval: bool = False,
    ) -> None:  # fmt: skip
        """Open the sink; on resume, first drop what the interrupted run logged past the checkpoint.

        Args:
            resume_iteration: the checkpoint's iteration when resuming: records of later iterations
                (logged after it, then lost with the kill) are removed, as are TensorBoard events.
            redo_eval: the evaluation at ``resume_iteration`` will be run again, so its record goes too.
        """
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer: Any = None
        if enabled and resume_iteration is not None:
            self.rewind(resume_iteration, redo_eval=redo_eval)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning(
                    "tensorboard is not installed (pip install 'gnws[train]'); logging to metrics.jsonl only"
                )
            else:
                purge = None if resume_iteration is None else resume_iteration + 1
                self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=purge)

    def rewind(self, iteration: int, *, redo_eval: bool = False) -> int:
        """Keep only records up to ``iteration`` (without its ``val`` record if ``redo_eval``); returns how many went.

        The file is rewritten atomically; a torn last line (a kill during an append) is dropped too.
        """
        if not self.path.is_file():
            return 0
        kept: list[str] = []
        dropped = 0
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
                step = int(record["iter"])
            except (ValueError, KeyError, TypeError):
                dropped += bool(line.strip())
                continue
            if step > iteration or (redo_eval and step == iteration and record.get("type") == "val"):
                dropped += 1
                continue
            kept.append(line)
        if dropped:
            atomic_write_bytes(self.path, "".join(f"{line}\n" for line in kept).encode())
            logger.info(
                "metrics.jsonl: dropped %d record(s) logged after the checkpoint of iteration %d", dropped, iteration
            )
        return dropped

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


def significant(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits (0.04123 stays 0.04123, not 0.0)."""
    return float(f"{value:.{digits}g}")


class Throughput:
    """Training speed (images/s over all processes, time and data time per step), ETA and memory.

    Timed on rank 0 between optimizer steps; each step ends in a host sync (the loss reduction),
    so the wall-clock intervals cover the GPU work. Checkpoints and evaluations are left out
    (:meth:`paused`). Data time is the time spent waiting for the data loader, a part of the step
    time. Memory is ``torch.cuda.max_memory_allocated`` of this process's device on GPU and the
    resident set size on CPU.
    """

    def __init__(self, ctx: DistContext, images_per_step: int) -> None:
        self.device = ctx.device
        self.images_per_step = images_per_step
        self.steps = 0
        self.seconds = 0.0
        self._window_steps = 0
        self._window_seconds = 0.0
        self._window_data = 0.0
        self._since = time.perf_counter()

    def start(self) -> None:
        self._since = time.perf_counter()

    def _lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._since = now - self._since, now
        return elapsed

    def data(self, seconds: float) -> None:
        """Add time spent waiting for a batch (part of the current step)."""
        self._window_data += seconds

    def step(self) -> None:
        elapsed = self._lap()
        self.steps += 1
        self.seconds += elapsed
        self._window_steps += 1
        self._window_seconds += elapsed

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the enclosed work (checkpointing, evaluation) out of the timing."""
        try:
            yield
        finally:
            self._since = time.perf_counter()

    def peak_memory_mib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**20

    def images_per_s(self) -> float:
        return self.steps * self.images_per_step / self.seconds if self.seconds > 0 else 0.0

    def eta_seconds(self, remaining_steps: int) -> float | None:
        """Time left for ``remaining_steps`` at the mean step time so far (evaluations not included)."""
        return remaining_steps * self.seconds / self.steps if self.steps else None

    def window(self) -> dict[str, float]:
        """Speed since the previous call, for a metrics record.

        ``time`` and ``data_time`` (seconds per step), ``images_per_s``, and ``max_mem_mib`` on GPU
        or ``rss_mib`` on CPU.
        """
        out: dict[str, float] = {}
        if self._window_steps:
            out["time"] = significant(self._window_seconds / self._window_steps)
            out["data_time"] = significant(self._window_data / self._window_steps)
        if self._window_seconds > 0:
            out["images_per_s"] = significant(self._window_steps * self.images_per_step / self._window_seconds)
        peak = self.peak_memory_mib()
        if peak is not None:
            out["max_mem_mib"] = round(peak, 1)
        else:
            out["rss_mib"] = round(rss_mib(), 1)
        self._window_steps, self._window_seconds, self._window_data = 0, 0.0, 0.0
        return out

    def postfix(self) -> dict[str, str]:
        """Short progress-bar fields."""
        out = {"img/s": f"{self.images_per_s():.3g}"}
        peak = self.peak_memory_mib()
        if peak is not None:
            out["mem"] = f"{peak / 1024:.1f}G"
        return out

    def summary(self) -> str:
        peak = self.peak_memory_mib()
        memory = f"peak GPU memory {peak:.0f} MiB (rank 0)" if peak is not None else f"on {self.device.type}"
        return f"{self.images_per_s():.3g} images/s over {self.seconds:.1f} s of training steps, {memory}"


def format_train_line(record: dict[str, Any], total_iters: int, epochs: int) -> str:
    """The INFO line of a ``train`` record: position, losses, lr, speed, ETA and memory."""
    parts = [f"iter {record['iter']}/{total_iters}", f"epoch {record['epoch']}/{epochs}"]
    first = ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask")  # mmdetection's log order
    losses = ["loss", *first, *sorted(k for k in record if k.startswith("loss_") and k not in first), "acc"]
    parts += [f"{k} {record[k]:.4g}" for k in losses if k in record]
    parts.append(f"lr {record['lr']:.4g}")
    if "time" in record:
        parts.append(f"time {record['time']:.3g} s/it (data {record['data_time']:.3g} s)")
    if "images_per_s" in record:
        parts.append(f"{record['images_per_s']:.3g} img/s")
    if "eta_s" in record:
        parts.append(f"eta {_duration(record['eta_s'])}")
    if "max_mem_mib" in record:
        parts.append(f"max mem {record['max_mem_mib']:.0f} MiB (GPU)")
    elif "rss_mib" in record:
        parts.append(f"mem {record['rss_mib']:.0f} MiB (RSS)")
    return "  ".join(parts)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return (f"{days}d " if days else "") + f"{hours}:{minutes:02d}:{secs:02d}"
