"""Training configuration, the GN+WS schedules and the learning-rate rule.

The zoo recipe, which every default here reproduces (mmdetection ``configs/_base_/schedules/
schedule_1x.py`` and ``configs/gn+ws/``; the project's notes are in ``docs/mmdetection-fidelity.md``,
section "Training recipe"):

- SGD, momentum 0.9, weight decay 1e-4 on every parameter, lr 0.02 for 16 images per step (the
  published models were trained on 8 GPUs x 2 images), no gradient clipping;
- linear warmup over the first 500 iterations from 0.001 x lr (mmengine ``LinearLR(start_factor=0.001,
  by_epoch=False, end=500)``), then x0.1 at each milestone epoch (``MultiStepLR(gamma=0.1)``);
- schedules 1x (12 epochs, milestones 8 and 11; the Faster R-CNN models), 2x (24; 16, 22) and
  20-23-24e (24; 20, 23; the paper's Mask R-CNN schedule);
- images resized keeping their aspect ratio to fit 1333x800, flipped horizontally with probability 0.5;
- 256 anchors sampled per image for the RPN, 512 RoIs for the R-CNN head; ``frozen_stages=1``.

mmdetection keeps lr 0.02 whatever the batch (``auto_scale_lr`` is off); gnws applies the linear
scaling rule (Goyal et al., arXiv:1706.02677) when ``lr`` is not given, which is the same lr at 16
images per step. The other knobs (AdamW, multi-scale training, large-scale jitter, custom milestones)
are additions on top of the recipe and off by default.

The resolved :class:`TrainConfig` is written as ``config.json`` beside the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import TrainConfigError

Init = Literal["zoo", "imagenet", "scratch"]
Amp = Literal["none", "bf16", "fp16"]
Optimizer = Literal["sgd", "adamw"]

BASE_LR = 0.02  # SGD, for BASE_BATCH images per step
BASE_BATCH = 16
SGD_WEIGHT_DECAY = 1e-4
ADAMW_LR = 1e-4
ADAMW_WEIGHT_DECAY = 0.05
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

    Every default of ``gnws train`` is the default of a field here (the command line only passes
    the options that were given).

    Attributes:
        model: zoo key naming the architecture (and, with ``init="zoo"``, the initial weights).
        work_dir: run folder: ``config.json``, ``checkpoints/``, ``metrics.jsonl``, ``tb/``.
        train_ann / train_images / val_ann / val_images: COCO annotation files and image folders
            (absolute paths when written by ``gnws train``).
        init: ``zoo`` (fine-tune a zoo checkpoint), ``imagenet`` (JHU GN+WS backbone) or ``scratch``.
        init_checkpoint: weights to start from instead of the cached zoo file (mmdet ``.pth`` or
            gnws ``.safetensors``).
        schedule: ``1x``, ``2x`` or ``20-23-24e``; ``epochs`` overrides its length and ``lr_steps``
            its milestones.
        max_iters: stop after this many optimizer steps (smoke runs); the schedule is unchanged.
        images_per_gpu / accumulate: images per process per forward, forwards per optimizer step.
        optimizer: ``sgd`` (the recipe) or ``adamw``.
        lr: absolute learning rate; ``None``: SGD applies the linear scaling rule to ``BASE_LR``,
            AdamW uses ``ADAMW_LR``.
        weight_decay: ``None``: 1e-4 for SGD (the recipe), 0.05 for AdamW.
        lr_steps: milestone epochs (lr x0.1 after each) instead of the schedule's.
        image_scale: ``(max_side, min_side)`` of the keep-ratio resize, mmdetection's (1333, 800);
            also the test scale of the exported model.
        multi_scale: ``(max_side, min_side)`` scales, one picked at random per image (mmdetection
            ``RandomChoiceResize(keep_ratio=True)``); ``None``: always ``image_scale``.
        scale_jitter: large-scale jitter ``(low, high)``: each image is resized to fit a
            ``image_scale[0]`` square scaled by a random factor in ``[low, high]``, randomly cropped
            to that square and padded to it (detectron2 ``ResizeScale`` + ``FixedSizeCrop``).
        frozen_stages: ResNet stages frozen (1 = stem and layer1, mmdetection's default).
        rpn_samples / rcnn_samples: anchors / RoIs sampled per image (mmdetection 256 / 512); lower
            values only for CPU smoke runs.
        amp: autocast dtype on GPU (``none`` on CPU).
        skip_bad_data: leave out images and annotations the data check finds unusable (missing,
            undecodable, wrong size, zero-size boxes, unknown categories) instead of stopping.
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
    optimizer: Optimizer = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    lr_steps: tuple[int, ...] | None = None
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    image_scale: tuple[int, int] = (1333, 800)
    multi_scale: tuple[tuple[int, int], ...] | None = None
    scale_jitter: tuple[float, float] | None = None
    flip_prob: float = 0.5
    frozen_stages: int = 1
    rpn_samples: int = 256
    rcnn_samples: int = 512
    min_image_size: int = 32
    amp: Amp = "none"
    device: str = "auto"
    seed: int = 0
    workers: int = 2
    skip_bad_data: bool = False
    checkpoint_interval: int = 0
    eval_interval: int = 1
    keep_checkpoints: int = 3
    log_interval: int = 20
    tensorboard: bool = True

    def __post_init__(self) -> None:
        get_schedule(self.schedule)
        errors = [message for ok, message in self._checks() if not ok]
        if errors:
            raise TrainConfigError("invalid training config: " + "; ".join(errors))

    def _checks(self) -> list[tuple[bool, str]]:
        epochs = self.schedule_spec.epochs if self.epochs is None or self.epochs >= 1 else 1
        steps = self.lr_steps or ()
        scales = self.multi_scale or ()
        jitter = self.scale_jitter
        return [
            (self.init in ("zoo", "imagenet", "scratch"), f"init must be zoo, imagenet or scratch, got {self.init!r}"),
            (self.amp in ("none", "bf16", "fp16"), f"amp must be none, bf16 or fp16, got {self.amp!r}"),
            (self.optimizer in ("sgd", "adamw"), f"optimizer must be sgd or adamw, got {self.optimizer!r}"),
            (self.images_per_gpu >= 1, f"images_per_gpu must be >= 1, got {self.images_per_gpu}"),
            (self.accumulate >= 1, f"accumulate must be >= 1, got {self.accumulate}"),
            (self.epochs is None or self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.max_iters is None or self.max_iters >= 1, f"max_iters must be >= 1, got {self.max_iters}"),
            (self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay is None or self.weight_decay >= 0,
             f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.lr_steps is None or (all(0 < m < epochs for m in steps) and list(steps) == sorted(set(steps))),
             f"lr_steps must be increasing epochs between 1 and {epochs - 1} (the run has {epochs} epochs), "
             f"got {list(steps)}"),
            (self.warmup_iters >= 0 and 0 < self.warmup_ratio <= 1, "warmup_iters >= 0, warmup_ratio in (0, 1]"),
            (len(self.image_scale) == 2 and min(self.image_scale) >= 32, f"image_scale must be two sides >= 32, "
             f"got {self.image_scale}"),
            (self.multi_scale is None or (bool(scales) and all(len(s) == 2 and min(s) >= 32 for s in scales)),
             f"multi_scale must be one or more (max, min) scales with sides >= 32, got {self.multi_scale}"),
            (jitter is None or (len(jitter) == 2 and 0 < jitter[0] <= jitter[1] <= 10),
             f"scale_jitter must be (low, high) with 0 < low <= high <= 10, got {jitter}"),
            (self.multi_scale is None or self.scale_jitter is None,
             "multi_scale and scale_jitter are two alternative resizes: give one of them"),
            (0.0 <= self.flip_prob <= 1.0, f"flip_prob must be in [0, 1], got {self.flip_prob}"),
            (-1 <= self.frozen_stages <= 4, f"frozen_stages must be in -1..4, got {self.frozen_stages}"),
            (self.workers >= 0 and self.checkpoint_interval >= 0 and self.eval_interval >= 0,
             "workers, checkpoint_interval and eval_interval must be >= 0"),
            (self.rpn_samples >= 2 and self.rcnn_samples >= 4, "rpn_samples must be >= 2 and rcnn_samples >= 4"),
            (self.keep_checkpoints >= 1 and self.log_interval >= 1, "keep_checkpoints and log_interval must be >= 1"),
        ]  # fmt: skip

    @property
    def schedule_spec(self) -> Schedule:
        """The schedule with ``epochs`` and ``lr_steps`` applied."""
        spec = get_schedule(self.schedule)
        if self.epochs is not None:
            spec = dataclasses.replace(spec, epochs=self.epochs)
        if self.lr_steps is not None:
            spec = dataclasses.replace(spec, milestones=tuple(self.lr_steps))
        return spec

    @property
    def effective_weight_decay(self) -> float:
        """``weight_decay``, or the optimizer's default: 1e-4 for SGD (the recipe), 0.05 for AdamW."""
        if self.weight_decay is not None:
            return self.weight_decay
        return ADAMW_WEIGHT_DECAY if self.optimizer == "adamw" else SGD_WEIGHT_DECAY

    def effective_batch(self, world_size: int) -> int:
        """Images per optimizer step over all processes."""
        return self.images_per_gpu * self.accumulate * world_size

    def scaled_lr(self, world_size: int) -> float:
        """``lr`` if given; else for SGD the linear scaling rule, 0.02 × batch / 16, and for AdamW 1e-4.

        AdamW's default is not scaled with the batch: its update size does not grow with the
        gradient's magnitude the way SGD's does; give ``--lr`` for very large batches.
        """
        if self.lr is not None:
            return self.lr
        if self.optimizer == "adamw":
            return ADAMW_LR
        return BASE_LR * self.effective_batch(world_size) / BASE_BATCH

    def to_json(self, *, world_size: int | None = None, extra: Mapping[str, Any] | None = None) -> str:
        """The config as JSON; with ``world_size``, plus a ``resolved`` section (what the run really used).

        ``resolved`` holds ``world_size``, ``images_per_step``, ``lr`` (the base learning rate after
        the linear scaling rule), ``weight_decay`` and ``extra`` (the trainer adds the annotation
        files' sha256). It is written to ``config.json`` for people and for export;
        :meth:`from_json` ignores it, and checkpoints compare the plain config.
        """
        data: dict[str, Any] = dataclasses.asdict(self)
        if world_size is not None:
            data[RESOLVED] = {
                "world_size": world_size,
                "images_per_step": self.effective_batch(world_size),
                "lr": self.scaled_lr(world_size),
                "weight_decay": self.effective_weight_decay,
                **(extra or {}),
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
        for key in ("image_scale", "lr_steps", "scale_jitter"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        if data.get("multi_scale") is not None:
            data["multi_scale"] = tuple(tuple(s) for s in data["multi_scale"])
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


def field_default(name: str) -> Any:
    """The default of a :class:`TrainConfig` field (for help texts)."""
    for f in dataclasses.fields(TrainConfig):
        if f.name == name:
            if f.default is dataclasses.MISSING:
                raise KeyError(f"TrainConfig.{name} has no default")
            return f.default
    raise KeyError(f"TrainConfig has no field {name!r}")


def config_differences(old: TrainConfig, new: TrainConfig, *, ignore: Collection[str] = ()) -> list[str]:
    """Names of the fields whose values differ between two configs, ``ignore`` left out."""
    a, b = dataclasses.asdict(old), dataclasses.asdict(new)
    return sorted(k for k in a if a[k] != b[k] and k not in ignore)


RESUMABLE_FIELDS = (
    "max_iters", "epochs", "device", "workers", "log_interval", "eval_interval", "checkpoint_interval",
    "keep_checkpoints", "tensorboard",
)  # fmt: skip
"""Settings a resumed run may change: how long it runs, where and how it reports; never what it learns from.

``epochs`` lengthens or shortens the run with the same milestones; ``work_dir`` always becomes the
folder resumed. Everything else (data, scales, lr, optimizer, seed, ...) fixes what the checkpoint's
weights, optimizer state and data order mean, so it must stay as the run started.
"""


def read_resolved(path: str | Path) -> dict[str, Any]:
    """The ``resolved`` section of a run's ``config.json`` (``{}`` for runs written before it existed)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    resolved = data.get(RESOLVED) if isinstance(data, dict) else None
    return dict(resolved) if isinstance(resolved, dict) else {}
