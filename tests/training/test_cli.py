"""`gnws train` options: defaults owned by TrainConfig, --config with overrides, resume flag rules, recipe knobs."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import pytest

from gnws.cli import build_parser
from training.cli import SIMPLE_FIELDS, new_run_config, resume_config
from training.config import TrainConfig
from training.errors import ResumeError, TrainConfigError

from .conftest import COCO, FASTER_R50, MASK_R50

TRAIN_ANN = str((COCO / "annotations" / "instances_train2017.json").resolve())


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", *argv])


def test_flags_default_to_none_and_the_config_owns_the_defaults(tmp_path: Path) -> None:
    args = parse("--model", MASK_R50, "--data", str(COCO), "--work-dir", str(tmp_path / "run"))
    assert all(getattr(args, f) is None for f in (*SIMPLE_FIELDS, "image_scale", "multi_scale", "scale_jitter"))
    cfg = new_run_config(args)
    expected = TrainConfig(
        model=MASK_R50, work_dir=str((tmp_path / "run").resolve()), schedule="2x",  # the zoo model's schedule
        train_ann=TRAIN_ANN, train_images=str((COCO / "train2017").resolve()),
        val_ann=str((COCO / "annotations" / "instances_val2017.json").resolve()),
        val_images=str((COCO / "val2017").resolve()),
    )  # fmt: skip
    assert cfg == expected


def test_config_file_starts_a_new_run_with_the_options_given_on_top(tmp_path: Path) -> None:
    old = TrainConfig(
        model=FASTER_R50, work_dir=str(tmp_path / "old"), train_ann=TRAIN_ANN, train_images=str(COCO / "train2017"),
        lr=0.01, image_scale=(320, 192), multi_scale=((320, 160), (320, 192)), lr_steps=(2,), epochs=3,
        optimizer="adamw", tensorboard=False, schedule="2x", eval_interval=2,
    )  # fmt: skip
    config = tmp_path / "config.json"
    config.write_text(old.to_json(world_size=4))  # a run's config.json, resolved section included
    new_dir = tmp_path / "new"
    cfg = new_run_config(parse("--config", str(config), "--lr", "0.02", "--tensorboard", "--work-dir", str(new_dir)))
    assert cfg == dataclasses.replace(old, lr=0.02, tensorboard=True, work_dir=str(new_dir.resolve()))
    moved = new_run_config(parse("--config", str(config), "--data", str(COCO), "--work-dir", str(new_dir)))
    assert moved.val_ann == str((COCO / "annotations" / "instances_val2017.json").resolve())
    assert moved.eval_interval == 2
    with pytest.raises(SystemExit):  # argparse: --config and --resume exclude each other
        parse("--config", str(config), "--resume", str(tmp_path / "old"))


def test_multi_scale_and_jitter_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ("--model", FASTER_R50, "--data", str(COCO), "--work-dir", str(tmp_path / "run"))
    cfg = new_run_config(parse(*base, "--image-scale", "1000", "600", "--multi-scale", "1333x640", "704"))
    assert cfg.multi_scale == ((1333, 640), (1000, 704))  # a bare number is the shorter side
    assert new_run_config(parse(*base, "--lsj")).scale_jitter == (0.1, 2.0)
    assert new_run_config(parse(*base, "--scale-jitter", "0.5", "1.5")).scale_jitter == (0.5, 1.5)
    assert new_run_config(parse(*base, "--lr-steps", "8", "10")).schedule_spec.milestones == (8, 10)
    for bad in (("--multi-scale", "big"), ("--lsj", "--scale-jitter", "1", "2")):
        with pytest.raises(SystemExit):
            parse(*base, *bad)
        assert "error:" in capsys.readouterr().err
    with pytest.raises(TrainConfigError, match="two alternative resizes"):
        new_run_config(parse(*base, "--lsj", "--multi-scale", "640"))


def test_resume_applies_resumable_flags_and_refuses_the_others(tmp_path: Path) -> None:
    run = TrainConfig(
        model=FASTER_R50, work_dir=str(tmp_path / "run"), train_ann=TRAIN_ANN,
        train_images=str((COCO / "train2017").resolve()), image_scale=(192, 128), max_iters=2,
    )  # fmt: skip
    relative = os.path.relpath(TRAIN_ANN)
    args = parse("--max-iters", "5", "--workers", "0", "--no-tensorboard", "--train-ann", relative,
                 "--image-scale", "192", "128")  # fmt: skip
    cfg = resume_config(run, args, tmp_path / "moved")  # the run's values given again are fine
    assert cfg == dataclasses.replace(run, max_iters=5, workers=0, tensorboard=False, work_dir=str(tmp_path / "moved"))
    with pytest.raises(ResumeError) as info:
        resume_config(run, parse("--seed", "3", "--skip-bad-data", "--max-iters", "9"), tmp_path / "run")
    message = str(info.value)
    assert "--seed 3 (the run's seed: 0)" in message
    assert "--skip-bad-data (the run's skip_bad_data: False)" in message
    assert "max-iters 9" not in message
    with pytest.raises(ResumeError, match=r"--work-dir \S+elsewhere \(the run's work_dir"):
        resume_config(run, parse("--work-dir", str(tmp_path / "elsewhere")), tmp_path / "run")
