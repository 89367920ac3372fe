"""Training configuration, the mmdetection GN+WS schedules and the learning-rate rule.

Recipe (``../shared/docs/mmdet-gnws-spec.md`` §5; mmdetection ``_base_/schedules/schedule_1x.py``
and ``configs/gn+ws``): SGD momentum 0.9, weight decay 1e-4, lr 0.02 for 16 images per step,
linear warmup over 500 iterations from 0.001, ×0.1 at each milestone epoch. The schedules are
1x (12 epochs, steps 8/11), 2x (24, 16/22) and 20-23-24e (24, 20/23). The learning rate for
another batch follows the linear scaling rule (Goyal et al., arXiv:1706.02677).

The resolved :class:`TrainConfig` is written as ``config.json`` beside the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import TrainConfigError

Init = Literal["zoo", "imagenet", "scratch"]
Amp = Literal["none", "bf16", "fp16"]

BASE_LR = 0.02
BASE_BATCH = 16
RESOLVED = "resolved"  # config.json section with the world size and the effective lr of the run


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """A step schedule: ``epochs`` in all, lr ×``gamma`` at each epoch in ``milestones``."""

    name: str
    epochs: int
    milestones: tuple[int, ...]
    gamma: float = 0.1


SCHEDULES: dict[str, Schedule] = {
    "1x": Schedule(name="1x", epochs=12, milestones=(8, 11)),
    "2x": Schedule(name="2x", epochs=24, milestones=(16, 22)),
    "20-23-24e": Schedule(name="20-23-24e", epochs=24, milestones=(20, 23)),
}


def get_schedule(name: str) -> Schedule:
    try:
        return SCHEDULES[name]
    except KeyError:
        raise TrainConfigError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}") from None


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run depends on (paths are stored as strings for JSON).

    Attributes:
        model: zoo key naming the architecture (and, with ``init="zoo"``, the initial weights).
        work_dir: run folder: ``config.json``, ``checkpoints/``, ``metrics.jsonl``, ``tb/``.
        train_ann / train_images / val_ann / val_images: COCO annotation files and image folders.
        init: ``zoo`` (fine-tune a zoo checkpoint), ``imagenet`` (JHU GN+WS backbone) or ``scratch``.
        init_checkpoint: weights to start from instead of the cached zoo file (mmdet ``.pth`` or
            gnws ``.safetensors``).
        schedule: ``1x``, ``2x`` or ``20-23-24e``; ``epochs`` overrides its length (milestones kept).
        max_iters: stop after this many optimizer steps (smoke runs); the schedule is unchanged.
        images_per_gpu / accumulate: images per process per forward, forwards per optimizer step.
        lr: absolute learning rate; ``None`` applies the linear scaling rule to ``BASE_LR``.
        image_scale: ``(max_side, min_side)`` of the keep-ratio resize, mmdetection's (1333, 800).
        frozen_stages: ResNet stages frozen (1 = stem and layer1, mmdetection's default).
        rpn_samples / rcnn_samples: anchors / RoIs sampled per image (mmdetection 256 / 512); lower
            values only for CPU smoke runs.
        amp: autocast dtype on GPU (``none`` on CPU).
        checkpoint_interval: also checkpoint every N iterations (0: only at epoch ends).
        eval_interval: evaluate every N epochs (0: never).
    """

    model: str
    work_dir: str
    train_ann: str
    train_images: str
    val_ann: str | None = None
    val_images: str | None = None
    init: Init = "zoo"
    init_checkpoint: str | None = None
    schedule: str = "1x"
    epochs: int | None = None
    max_iters: int | None = None
    images_per_gpu: int = 2
    accumulate: int = 1
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    image_scale: tuple[int, int] = (1333, 800)
    flip_prob: float = 0.5
    frozen_stages: int = 1
    rpn_samples: int = 256
    rcnn_samples: int = 512
    min_image_size: int = 32
    amp: Amp = "none"
    device: str = "auto"
    seed: int = 0
    workers: int = 2
    checkpoint_interval: int = 0
    eval_interval: int = 1
    keep_checkpoints: int = 3
    log_interval: int = 20
    tensorboard: bool = True

    def __post_init__(self) -> None:
        get_schedule(self.schedule)
        checks = [
            (self.init in ("zoo", "imagenet", "scratch"), f"init must be zoo, imagenet or scratch, got {self.init!r}"),
            (self.amp in ("none", "bf16", "fp16"), f"amp must be none, bf16 or fp16, got {self.amp!r}"),
            (self.images_per_gpu >= 1, f"images_per_gpu must be >= 1, got {self.images_per_gpu}"),
            (self.accumulate >= 1, f"accumulate must be >= 1, got {self.accumulate}"),
            (self.epochs is None or self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.max_iters is None or self.max_iters >= 1, f"max_iters must be >= 1, got {self.max_iters}"),
            (self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.warmup_iters >= 0 and 0 < self.warmup_ratio <= 1, "warmup_iters >= 0, warmup_ratio in (0, 1]"),
            (len(self.image_scale) == 2 and min(self.image_scale) >= 32, f"image_scale must be two sides >= 32, "
             f"got {self.image_scale}"),
            (0.0 <= self.flip_prob <= 1.0, f"flip_prob must be in [0, 1], got {self.flip_prob}"),
            (-1 <= self.frozen_stages <= 4, f"frozen_stages must be in -1..4, got {self.frozen_stages}"),
            (self.workers >= 0 and self.checkpoint_interval >= 0 and self.eval_interval >= 0,
             "workers, checkpoint_interval and eval_interval must be >= 0"),
            (self.rpn_samples >= 2 and self.rcnn_samples >= 4, "rpn_samples must be >= 2 and rcnn_samples >= 4"),
            (self.keep_checkpoints >= 1 and self.log_interval >= 1, "keep_checkpoints and log_interval must be >= 1"),
        ]  # fmt: skip
        errors = [message for ok, message in checks if not ok]
        if errors:
            raise TrainConfigError("invalid training config: " + "; ".join(errors))

    @property
    def schedule_spec(self) -> Schedule:
        base = get_schedule(self.schedule)
        return base if self.epochs is None else dataclasses.replace(base, epochs=self.epochs)

    def effective_batch(self, world_size: int) -> int:
        """Images per optimizer step over all processes."""
        return self.images_per_gpu * self.accumulate * world_size

    def scaled_lr(self, world_size: int) -> float:
        """``lr`` if given, else the linear scaling rule: 0.02 × batch / 16."""
        if self.lr is not None:
            return self.lr
        return BASE_LR * self.effective_batch(world_size) / BASE_BATCH

    def to_json(self, *, world_size: int | None = None) -> str:
        """The config as JSON; with ``world_size``, plus a ``resolved`` section (what the run really used).

        ``resolved`` holds ``world_size``, ``images_per_step`` and ``lr`` (the base learning rate after
        the linear scaling rule). It is written to ``config.json`` for people and for export;
        :meth:`from_json` ignores it, and checkpoints compare the plain config.
        """
        data: dict[str, Any] = dataclasses.asdict(self)
        if world_size is not None:
            data[RESOLVED] = {
                "world_size": world_size,
                "images_per_step": self.effective_batch(world_size),
                "lr": self.scaled_lr(world_size),
            }
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        data: dict[str, Any] = json.loads(text)
        if not isinstance(data, dict):
            raise TrainConfigError(f"a training config is a JSON object, got {type(data).__name__}")
        data.pop(RESOLVED, None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TrainConfigError(f"unknown training config fields {unknown}; this run needs a newer gnws")
        if "image_scale" in data:
            data["image_scale"] = tuple(data["image_scale"])
        return cls(**data)

    @classmethod
    def read(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            return cls.from_json(path.read_text())
        except FileNotFoundError:
            raise TrainConfigError(f"no training config at {path}; is this a gnws training run folder?") from None
        except (ValueError, TypeError) as exc:
            raise TrainConfigError(f"{path} is not a valid training config: {exc}") from None


def read_resolved(path: str | Path) -> dict[str, Any]:
    """The ``resolved`` section of a run's ``config.json`` (``{}`` for runs written before it existed)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    resolved = data.get(RESOLVED) if isinstance(data, dict) else None
    return dict(resolved) if isinstance(resolved, dict) else {}


class WarmupMultiStepLR:
    """mmdetection's LinearLR warmup + MultiStepLR, as a pure function of (iteration, epoch).

    ``factor = warmup(iteration) × gamma ** (number of milestones <= epoch)`` with
    ``warmup(i) = ratio + (1 - ratio) · i / warmup_iters`` for ``i < warmup_iters`` (mmengine
    ``LinearLR(start_factor=ratio, end=warmup_iters, by_epoch=False)``; equal to mmcv's v2
    ``warmup='linear'``). Being a pure function, its state is just the position.
    """

    def __init__(self, base_lr: float, schedule: Schedule, warmup_iters: int, warmup_ratio: float) -> None:
        self.base_lr = base_lr
        self.schedule = schedule
        self.warmup_iters = warmup_iters
        self.warmup_ratio = warmup_ratio
        self.iteration = 0
        self.epoch = 0

    def lr_at(self, iteration: int, epoch: int) -> float:
        factor = self.schedule.gamma ** sum(1 for m in self.schedule.milestones if epoch >= m)
        if iteration < self.warmup_iters:
            factor *= self.warmup_ratio + (1 - self.warmup_ratio) * iteration / self.warmup_iters
        return self.base_lr * factor

    def apply(self, optimizer: Any, iteration: int, epoch: int) -> float:
        """Set the lr of every param group for the step about to be taken; returns it."""
        self.iteration, self.epoch = iteration, epoch
        lr = self.lr_at(iteration, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "base_lr": self.base_lr, "iteration": self.iteration, "epoch": self.epoch,
            "warmup_iters": self.warmup_iters, "warmup_ratio": self.warmup_ratio,
            "milestones": list(self.schedule.milestones), "gamma": self.schedule.gamma,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self.epoch = int(state["epoch"])
