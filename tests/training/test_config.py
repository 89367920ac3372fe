"""Schedules, the linear scaling rule, warmup and TrainConfig validation/serialisation."""

from __future__ import annotations

import dataclasses

import pytest

from training.config import SCHEDULES, TrainConfig, WarmupMultiStepLR
from training.errors import TrainConfigError


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
