"""Resume edge cases on one short real run: a lost evaluation, weights-only and foreign checkpoints, provenance.

One module-scoped run (1 train image, 1 val image, ``--max-iters 1``, lr auto-scaled) is trained in
process; each test copies what it needs from it. Its initial weights are deleted after it finished,
so every resume below also shows that resuming never reads the init weights again.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gnws.cli import main as gnws_main
from models import read_model_info
from training.checkpoint import load_checkpoint, read_best, save_checkpoint
from training.runtime import MetricsLog

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
        "train", "--model", FASTER_R50, "--init-checkpoint", str(init), "--train-ann", str(train_ann),
        "--train-images", str(COCO / "train2017"), "--val-ann", str(val_ann), "--val-images", str(COCO / "val2017"),
        "--work-dir", str(run), "--epochs", "3", "--max-iters", "1", "--flip-prob", "0", *FAST_ARGS,
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
    assert config["resolved"] == {"world_size": 1, "images_per_step": 1, "lr": pytest.approx(0.02 / 16)}
    train = [r for r in read_jsonl(finished_run / "metrics.jsonl") if r["type"] == "train"]
    assert train
    assert all(r["images_per_s"] > 0 for r in train)
    assert all("max_mem_mib" not in r for r in train)  # CPU run: no GPU memory to report


@pytest.mark.slow
def test_export_provenance_has_the_effective_lr_and_world_size(finished_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported.safetensors"
    assert gnws_main(["export", str(finished_run), "-o", str(out)]) == 0
    schedule = read_model_info(out).provenance["schedule"]
    assert schedule["lr"] == pytest.approx(0.02 / 16)
    assert schedule["lr_option"] is None
    assert schedule["world_size"] == 1
    assert schedule["images_per_step"] == 1


@pytest.mark.slow
def test_resume_runs_the_evaluation_a_kill_cut_short(
    finished_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = _copy_run(finished_run, tmp_path / "run")
    ckpts = run / "checkpoints"
    assert load_checkpoint(ckpts / ITER1)["eval_due"] is True
    # the state a SIGKILL between the epoch-end save and its evaluation leaves: no eval record, no best
    for name in ("best.pt", "best.json", "evaluated.json"):
        (ckpts / name).unlink()
    records = [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] != "val"]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    caplog.set_level(logging.INFO)
    assert gnws_main(["train", "--resume", str(run), "--max-iters", "2"]) == 0
    assert "evaluation at iteration 1 did not complete" in caplog.text
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["iter"] for r in records if r["type"] == "val"] == [1, 2]  # the lost eval ran, then epoch 2's
    assert [r["iter"] for r in records if r["type"] == "train"] == [1, 2]
    duplicates = [k for k, n in Counter((r["type"], r["iter"]) for r in records).items() if n > 1]
    assert not duplicates
    best = read_best(ckpts)
    assert best["iteration"] in (1, 2)
    assert json.loads((ckpts / "best.json").read_text()) == best
    val = {r["iter"]: r["bbox_mAP"] for r in records if r["type"] == "val"}
    assert best["metrics"]["bbox_mAP"] == max(val.values())
    assert json.loads((ckpts / "evaluated.json").read_text()) == {"iteration": 2}
    assert all(math.isfinite(r["loss"]) for r in records if r["type"] == "train")


@pytest.mark.slow
def test_resume_from_best_pt_says_it_is_weights_only(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy_run(finished_run, tmp_path / "run", ("config.json", "checkpoints/best.pt"))
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
