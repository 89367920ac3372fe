"""Schedules, the linear scaling rule, warmup, optimizers and TrainConfig validation/serialisation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from training.config import SCHEDULES, TrainConfig, config_differences
from training.errors import TrainConfigError
from training.optim import WarmupMultiStepLR, build_optimizer


def make_cfg(**kw) -> TrainConfig:
    return TrainConfig(model="faster_rcnn_r50_fpn_gn_ws-all_1x_coco", work_dir="w", train_ann="a.json",
                       train_images="imgs", **kw)


def test_schedules_by_name_follow_mmdetection() -> None:
    assert {k: (s.epochs, s.milestones) for k, s in SCHEDULES.items()} == {
        "1x": (12, (8, 11)), "2x": (24, (16, 22)), "20-23-24e": (24, (20, 23)),
    }  # fmt: skip
    with pytest.raises(TrainConfigError, match="unknown schedule"):
        make_cfg(schedule="3x")


@pytest.mark.parametrize(
    ("world", "per_gpu", "accumulate", "lr"),
    [(8, 2, 1, 0.02), (1, 2, 1, 0.0025), (4, 1, 2, 0.01), (2, 2, 4, 0.02)],
)
def test_linear_scaling_rule(world: int, per_gpu: int, accumulate: int, lr: float) -> None:
    cfg = make_cfg(images_per_gpu=per_gpu, accumulate=accumulate)
    assert cfg.scaled_lr(world) == pytest.approx(lr)
    assert make_cfg(lr=0.05).scaled_lr(world) == 0.05


def test_warmup_then_steps() -> None:
    sched = WarmupMultiStepLR(0.02, SCHEDULES["1x"], warmup_iters=500, warmup_ratio=0.001)
    assert sched.lr_at(0, 0) == pytest.approx(0.02 * 0.001)
    assert sched.lr_at(250, 0) == pytest.approx(0.02 * (0.001 + 0.999 * 0.5))
    assert sched.lr_at(500, 0) == pytest.approx(0.02)
    assert sched.lr_at(10_000, 7) == pytest.approx(0.02)
    assert sched.lr_at(10_000, 8) == pytest.approx(0.002)
    assert sched.lr_at(10_000, 11) == pytest.approx(0.0002)
    two_x = WarmupMultiStepLR(0.02, SCHEDULES["20-23-24e"], 500, 0.001)
    assert [two_x.lr_at(9999, e) for e in (19, 20, 23)] == pytest.approx([0.02, 0.002, 0.0002])


def test_epochs_override_keeps_milestones() -> None:
    spec = make_cfg(schedule="2x", epochs=3).schedule_spec
    assert (spec.epochs, spec.milestones) == (3, (16, 22))


def test_json_roundtrip_and_validation() -> None:
    cfg = make_cfg(image_scale=(320, 192), amp="bf16", max_iters=5)
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(TrainConfigError, match="images_per_gpu") as info:
        dataclasses.replace(cfg, images_per_gpu=0, accumulate=0)
    assert "accumulate" in str(info.value)
    with pytest.raises(TrainConfigError, match="unknown training config fields"):
        TrainConfig.from_json('{"model": "x", "bogus": 1}')


def test_lr_steps_replace_the_milestones_and_are_validated() -> None:
    cfg = make_cfg(schedule="1x", epochs=6, lr_steps=(2, 5))
    assert (cfg.schedule_spec.epochs, cfg.schedule_spec.milestones) == (6, (2, 5))
    sched = WarmupMultiStepLR(0.02, cfg.schedule_spec, warmup_iters=0, warmup_ratio=0.001)
    assert [sched.lr_at(100, e) for e in (1, 2, 4, 5)] == pytest.approx([0.02, 0.002, 0.002, 0.0002])
    for bad in ((5, 2), (0, 3), (2, 6), (3, 3)):
        with pytest.raises(TrainConfigError, match="lr_steps must be increasing epochs between 1 and 5"):
            make_cfg(epochs=6, lr_steps=bad)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.GroupNorm(2, 4)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_sgd_is_the_recipe_and_adamw_has_its_own_defaults() -> None:
    model = _Tiny()
    sgd = build_optimizer(make_cfg(), model, lr=0.01)
    assert isinstance(sgd, torch.optim.SGD)
    assert [(g["momentum"], g["weight_decay"], len(g["params"])) for g in sgd.param_groups] == [(0.9, 1e-4, 4)]

    adamw_cfg = make_cfg(optimizer="adamw")
    assert adamw_cfg.scaled_lr(8) == 1e-4  # not scaled with the batch
    assert make_cfg(optimizer="adamw", lr=3e-4).scaled_lr(8) == 3e-4  # --lr overrides
    adamw = build_optimizer(adamw_cfg, model, lr=adamw_cfg.scaled_lr(1))
    assert isinstance(adamw, torch.optim.AdamW)
    decay, no_decay = adamw.param_groups
    assert decay["weight_decay"] == 0.05
    assert [p.shape for p in decay["params"]] == [model.conv.weight.shape]
    assert no_decay["weight_decay"] == 0.0  # conv bias, GN weight and bias
    assert len(no_decay["params"]) == 3
    assert build_optimizer(make_cfg(optimizer="adamw", weight_decay=0.1), model, 1e-4).param_groups[0][
        "weight_decay"
    ] == 0.1


def test_resize_options_are_validated() -> None:
    with pytest.raises(TrainConfigError, match="two alternative resizes"):
        make_cfg(multi_scale=((320, 192),), scale_jitter=(0.1, 2.0))
    with pytest.raises(TrainConfigError, match="multi_scale must be"):
        make_cfg(multi_scale=((320, 16),))
    with pytest.raises(TrainConfigError, match="scale_jitter must be"):
        make_cfg(scale_jitter=(2.0, 0.5))


def test_a_config_written_before_the_new_fields_reads_with_their_defaults() -> None:
    cfg = make_cfg(image_scale=(320, 192), multi_scale=((320, 160), (320, 192)), lr_steps=(8,), scale_jitter=None)
    old = json.loads(cfg.to_json())
    for field in ("optimizer", "weight_decay", "lr_steps", "multi_scale", "scale_jitter", "skip_bad_data"):
        del old[field]
    read = TrainConfig.from_json(json.dumps(old))
    assert config_differences(read, cfg) == ["lr_steps", "multi_scale"]
    assert read.optimizer == "sgd"
    assert read.effective_weight_decay == 1e-4
    assert TrainConfig.from_json(cfg.to_json(world_size=2)) == cfg  # tuples of tuples survive JSON
