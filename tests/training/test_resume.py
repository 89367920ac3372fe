"""Resume edge cases on one short real run: a lost evaluation, weights-only and foreign checkpoints, flags
changed on resume, the log lines, provenance and file modes.

One module-scoped run (1 train image, 1 val image, ``--max-iters 1``, lr auto-scaled, TensorBoard on) is
trained in process; each test copies what it needs from it. Its initial weights are deleted after it
finished, so every resume below also shows that resuming never reads the initial weights again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import training.engine
from gnws.cli import main as gnws_main
from models import read_model_info
from models.files import file_sha256
from training.checkpoint import load_checkpoint, read_best, save_checkpoint
from training.cli import load_for_eval
from training.engine import improves
from training.runtime import MetricsLog, state_digest

from .conftest import COCO, FAST_ARGS, FASTER_R50, read_jsonl, subset_annotations

ITER1 = "iter_00000001.pt"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, mmdet_checkpoint: Callable[[str], Path]) -> Path:
    root = tmp_path_factory.mktemp("resume")
    init = root / "init.pth"
    shutil.copyfile(mmdet_checkpoint(FASTER_R50), init)
    train_ann = subset_annotations(root / "ann" / "train.json", "train2017", ["000000114694.jpg"])
    val_ann = subset_annotations(root / "ann" / "val.json", "val2017", ["000000404484.jpg"])
    run = root / "run"
    rc = gnws_main([
        "train", "--model", FASTER_R50, "--init-checkpoint", str(init), "--train-ann", os.path.relpath(train_ann),
        "--train-images", str(COCO / "train2017"), "--val-ann", str(val_ann), "--val-images", str(COCO / "val2017"),
        "--work-dir", str(run), "--epochs", "3", "--max-iters", "1", "--flip-prob", "0", *FAST_ARGS, "--tensorboard",
    ])  # fmt: skip
    if rc != 0:
        pytest.fail(f"the fixture run failed with exit status {rc}")
    init.unlink()  # a resume must not need the initial weights any more
    return run


def _copy_run(run: Path, dest: Path, files: tuple[str, ...] | None = None) -> Path:
    if files is None:
        shutil.copytree(run, dest)
    else:
        (dest / "checkpoints").mkdir(parents=True)
        for name in files:
            shutil.copyfile(run / name, dest / name)
    return dest


@pytest.mark.slow
def test_run_records_effective_lr_world_size_and_throughput(finished_run: Path) -> None:
    config = json.loads((finished_run / "config.json").read_text())
    assert config["lr"] is None  # auto-scaled: 0.02 x 1 image / 16
    resolved = config["resolved"]
    assert {k: resolved[k] for k in ("world_size", "images_per_step", "lr", "weight_decay")} == {
        "world_size": 1, "images_per_step": 1, "lr": pytest.approx(0.02 / 16), "weight_decay": 1e-4,
    }  # fmt: skip
    train_ann = Path(config["train_ann"])
    assert train_ann.is_absolute()  # given as a relative path
    assert resolved["data"] == {
        "train_ann": str(train_ann), "train_ann_sha256": file_sha256(train_ann),
        "val_ann": config["val_ann"], "val_ann_sha256": file_sha256(config["val_ann"]),
    }  # fmt: skip
    train = [r for r in read_jsonl(finished_run / "metrics.jsonl") if r["type"] == "train"]
    assert train
    assert all(r["images_per_s"] > 0 for r in train)
    assert all(r["time"] >= r["data_time"] > 0 for r in train)
    assert all(r["rss_mib"] > 0 for r in train)
    assert all("max_mem_mib" not in r for r in train)  # CPU run: no GPU memory to report


@pytest.mark.slow
def test_run_files_get_the_umask_permissions(finished_run: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    files = [p for p in finished_run.rglob("*") if p.is_file()]
    assert any(p.parent.name == "tb" for p in files)  # TensorBoard's event file too
    assert {p.relative_to(finished_run).as_posix(): oct(p.stat().st_mode & 0o777) for p in files} == {
        p.relative_to(finished_run).as_posix(): oct(0o666 & ~mask) for p in files
    }


@pytest.mark.slow
def test_export_provenance_has_the_effective_lr_and_world_size(finished_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported.safetensors"
    assert gnws_main(["export", str(finished_run), "-o", str(out)]) == 0
    provenance = read_model_info(out).provenance
    schedule = provenance["schedule"]
    assert schedule["lr"] == pytest.approx(0.02 / 16)
    assert schedule["lr_option"] is None
    assert schedule["world_size"] == 1
    assert schedule["images_per_step"] == 1
    assert schedule["optimizer"] == "sgd"
    data = provenance["data"]
    assert Path(data["train_ann"]).is_absolute()
    assert data["train_ann_sha256"] == file_sha256(data["train_ann"])
    assert data["val_ann_sha256"] == file_sha256(data["val_ann"])
    assert provenance["version"] is None  # -o: a file, not a model-store version
    assert provenance["epoch"] == 1


@pytest.mark.slow
def test_resume_runs_the_evaluation_a_kill_cut_short(
    finished_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _copy_run(finished_run, tmp_path / "run")
    ckpts = run / "checkpoints"
    assert load_checkpoint(ckpts / ITER1)["eval_due"] is True
    assert not (ckpts / "best.pt").exists()  # the fixture weights score bbox AP 0.0 here: no best.pt for that
    # the state a SIGKILL between the epoch-end save and its evaluation leaves: no eval record
    (ckpts / "evaluated.json").unlink()
    records = [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] != "val"]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # the real evaluation, with the bbox AP a better model would get: 0.3 at iteration 1, 0.2 at 2
    real_evaluate = training.engine.evaluate
    scores = iter([0.3, 0.2])

    def scored(*args: Any, **kwargs: Any) -> Any:
        result = real_evaluate(*args, **kwargs)
        result.metrics["bbox_mAP"] = next(scores)
        return result

    monkeypatch.setattr(training.engine, "evaluate", scored)

    caplog.set_level(logging.INFO)
    assert gnws_main(["train", "--resume", str(run), "--max-iters", "2"]) == 0
    assert "evaluation at iteration 1 did not complete" in caplog.text
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["iter"] for r in records if r["type"] == "val"] == [1, 2]  # the lost eval ran, then epoch 2's
    assert [r["iter"] for r in records if r["type"] == "train"] == [1, 2]
    duplicates = [k for k, n in Counter((r["type"], r["iter"]) for r in records).items() if n > 1]
    assert not duplicates
    best = read_best(ckpts)
    assert best["iteration"] == 1  # 0.3, then 0.2 is no improvement
    assert best["metrics"]["bbox_mAP"] == 0.3
    assert json.loads((ckpts / "best.json").read_text()) == best
    assert load_checkpoint(ckpts / "best.pt")["position"]["iteration"] == 1
    assert "the best is still 0.3000 (iteration 1)" in caplog.text
    assert json.loads((ckpts / "evaluated.json").read_text()) == {"iteration": 2}
    assert all(math.isfinite(r["loss"]) for r in records if r["type"] == "train")


@pytest.mark.slow
def test_resume_from_best_pt_says_it_is_weights_only(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy_run(finished_run, tmp_path / "run", ("config.json",))
    state = load_checkpoint(finished_run / "checkpoints" / ITER1)
    weights = ("model", "config", "detector", "best", "position", "world_size", "lr")  # what best.pt holds
    save_checkpoint(run / "checkpoints" / "best.pt", {k: state[k] for k in weights})
    rc = gnws_main(["train", "--resume", str(run / "checkpoints" / "best.pt")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "best.pt is the best evaluated weights only" in err
    assert f"--resume {run}" in err
    assert "iter_*.pt" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt"]


@pytest.mark.slow
def test_resume_with_another_world_size_is_refused(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy_run(finished_run, tmp_path / "run", ("config.json",))
    state = load_checkpoint(finished_run / "checkpoints" / ITER1)
    state["world_size"], state["rng"] = 2, state["rng"] * 2  # as if written by a 2-process torchrun job
    save_checkpoint(run / "checkpoints" / ITER1, {k: v for k, v in state.items() if k != "format"})
    rc = gnws_main(["train", "--resume", str(run), "--max-iters", "2"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "written by 2 process(es) but this run has 1" in err
    assert "WORLD_SIZE=2" in err
    assert not (run / "checkpoints" / "iter_00000002.pt").exists()


@pytest.mark.slow
def test_resume_refuses_changed_settings_naming_each_flag(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy_run(finished_run, tmp_path / "run")
    rc = gnws_main([
        "train", "--resume", str(run), "--max-iters", "2", "--lr", "0.5", "--image-scale", "128", "96",
        "--flip-prob", "0", "--optimizer", "adamw",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert "--lr 0.5 (the run's lr: not set)" in line
    assert "--image-scale 128 96 (the run's image_scale: 192 128)" in line
    assert "--optimizer adamw (the run's optimizer: sgd)" in line
    assert "flip" not in line  # --flip-prob 0 is the run's value: accepted
    assert "--max-iters" in line  # named among the flags that may change
    assert f"--config {run / 'config.json'}" in line
    assert not (run / "checkpoints" / "iter_00000002.pt").exists()


@pytest.mark.slow
def test_resume_applies_the_flags_that_may_change_and_logs_readable_lines(
    finished_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy_run(finished_run, tmp_path / "run")
    caplog.set_level(logging.INFO)
    rc = gnws_main([
        "train", "--resume", str(run), "--max-iters", "3", "--eval-interval", "0", "--keep-checkpoints", "1",
        "--log-interval", "5", "--image-scale", "192", "128", "--no-tensorboard",
    ])  # fmt: skip
    assert rc == 0, caplog.text[-3000:]
    config = json.loads((run / "config.json").read_text())
    assert (config["max_iters"], config["eval_interval"], config["keep_checkpoints"]) == (3, 0, 1)
    assert (config["log_interval"], config["tensorboard"]) == (5, False)
    assert sorted(p.name for p in (run / "checkpoints").glob("iter_*.pt")) == ["iter_00000003.pt"]
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["iter"] for r in records if r["type"] == "val"] == [1]  # no evaluation after the resume
    # 1 image, batch 1: iteration i is epoch i (1-based), in train and checkpoint records alike; iteration 2
    # is not logged (--log-interval 5), the last one is
    assert {(r["type"], r["iter"], r["epoch"]) for r in records if r["iter"] > 1} == {
        ("train", 3, 3), ("checkpoint", 2, 2), ("checkpoint", 3, 3),
    }  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if r.name == "training.engine" and "iter " in r.getMessage()]
    assert len(lines) == 1
    assert re.fullmatch(
        r"iter 3/3  epoch 3/3  loss [\d.]+  loss_rpn_cls [\d.e-]+  loss_rpn_bbox [\d.e-]+  loss_cls [\d.e-]+  "
        r"loss_bbox [\d.e-]+  acc [\d.e-]+  lr [\d.e-]+  time [\d.e-]+ s/it \(data [\d.e-]+ s\)  [\d.e-]+ img/s  "
        r"eta \d+:\d\d:\d\d  mem \d+ MiB \(RSS\)",
        lines[0],
    ), lines[0]
    assert "resuming with --max-iters 3, --eval-interval 0, --keep-checkpoints 1" in caplog.text
    assert "\r" not in capsys.readouterr().err  # not a terminal: no progress bar


def test_best_needs_a_strict_improvement_above_zero() -> None:
    assert not improves(0.0, None)  # the first evaluation of an untrained head is no best
    assert improves(0.01, None)
    assert improves(0.2, 0.1)
    assert not improves(0.1, 0.1)  # a tie keeps the earlier best.pt
    assert not improves(0.05, 0.1)


def test_metrics_rewind_drops_what_came_after_the_checkpoint(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    records = [
        {"type": "train", "iter": 1}, {"type": "checkpoint", "iter": 1}, {"type": "val", "iter": 1},
        {"type": "train", "iter": 2}, {"type": "val", "iter": 2},
    ]  # fmt: skip
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"type": "tra')  # torn last line
    MetricsLog(tmp_path, True, False, resume_iteration=1)
    assert read_jsonl(log) == records[:3]
    MetricsLog(tmp_path, True, False, resume_iteration=1, redo_eval=True)
    assert read_jsonl(log) == records[:2]
    other_rank = MetricsLog(tmp_path, False, False, resume_iteration=0)
    assert other_rank.enabled is False
    assert read_jsonl(log) == records[:2]  # only rank 0 touches the file


def test_best_pt_record_is_read_without_the_weights(tmp_path: Path) -> None:
    best = {"iteration": 3, "metrics": {"bbox_mAP": 0.5}}
    save_checkpoint(tmp_path / "best.pt", {"model": {"w": torch.zeros(3)}, "best": best})
    assert read_best(tmp_path) == best
    assert read_best(tmp_path / "nowhere") == {}


@pytest.mark.slow
def test_eval_loads_a_training_checkpoint_itself(finished_run: Path) -> None:
    ckpt = finished_run / "checkpoints" / ITER1
    detector = load_for_eval(str(ckpt), None)
    assert state_digest(detector.state_dict()) == state_digest(load_checkpoint(ckpt)["model"])
