"""The optimizer and the learning-rate schedule of a run.

- **SGD** (the zoo recipe, the default): momentum 0.9 and weight decay 1e-4 on every trained
  parameter, as mmdetection's ``optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.02,
  momentum=0.9, weight_decay=0.0001))`` in ``configs/_base_/schedules/schedule_1x.py``.
- **AdamW** (an addition, not the published recipe): betas (0.9, 0.999), lr 1e-4 and weight decay
  0.05 unless ``--lr``/``--weight-decay`` are given. Biases and GroupNorm parameters (every 1-d
  parameter) get no weight decay, as mmdetection's AdamW configs do with ``norm_decay_mult=0`` /
  ``bias_decay_mult=0`` and detectron2's ViTDet recipe with ``weight_decay_norm=0``: decaying a
  normalisation scale towards 0 at 0.05 fights the normalisation itself.

The schedule is the same for both: mmengine's ``LinearLR`` warmup followed by ``MultiStepLR``
(:class:`WarmupMultiStepLR`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import Schedule, TrainConfig

ADAMW_BETAS = (0.9, 0.999)


def build_optimizer(cfg: TrainConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.optimizer`` over the parameters of ``model`` that require gradients.

    Args:
        cfg: the run's settings (``optimizer``, ``momentum``, ``weight_decay``).
        model: the detector; frozen parameters (``requires_grad=False``) are left out.
        lr: the base learning rate (:meth:`TrainConfig.scaled_lr`); the schedule rescales it.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameter; lower --frozen-stages")
    weight_decay = cfg.effective_weight_decay
    match cfg.optimizer:
        case "sgd":
            return torch.optim.SGD([p for _, p in named], lr=lr, momentum=cfg.momentum, weight_decay=weight_decay)
        case "adamw":
            decay = [p for _, p in named if p.ndim > 1]
            no_decay = [p for _, p in named if p.ndim <= 1]  # biases and GroupNorm weight/bias
            groups: list[dict[str, Any]] = [
                {"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ]
            return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=ADAMW_BETAS)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw")


class WarmupMultiStepLR:
    """mmdetection's LinearLR warmup + MultiStepLR, as a pure function of (iteration, epoch).

    ``factor = warmup(iteration) × gamma ** (number of milestones <= epoch)`` with
    ``warmup(i) = ratio + (1 - ratio) · i / warmup_iters`` for ``i < warmup_iters`` (mmengine
    ``LinearLR(start_factor=ratio, end=warmup_iters, by_epoch=False)``; equal to mmcv's v2
    ``warmup='linear'``). ``epoch`` is 0-based here (the number of completed epochs), so a
    milestone ``m`` takes effect for the ``m+1``-th epoch, as ``MultiStepLR(milestones=[m])``
    stepped once per epoch does. Being a pure function, its state is just the position.
    """

    def __init__(self, base_lr: float, schedule: Schedule, warmup_iters: int, warmup_ratio: float) -> None:
        self.base_lr = base_lr
        self.schedule = schedule
        self.warmup_iters = warmup_iters
        self.warmup_ratio = warmup_ratio
        self.iteration = 0
        self.epoch = 0

    def lr_at(self, iteration: int, epoch: int) -> float:
        """The learning rate of the step taken at 0-based ``iteration`` within 0-based ``epoch``."""
        factor = self.schedule.gamma ** sum(1 for m in self.schedule.milestones if epoch >= m)
        if iteration < self.warmup_iters:
            factor *= self.warmup_ratio + (1 - self.warmup_ratio) * iteration / self.warmup_iters
        return self.base_lr * factor

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int, epoch: int) -> float:
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
