"""Real training runs on the fixture: loss decrease, kill + resume equivalence, 2-process DDP (gloo).

Runs go through ``python -m training train`` in subprocesses, as users (and torchrun) run them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from training.checkpoint import load_checkpoint
from training.runtime import state_digest

from .conftest import COCO, FAST_ARGS, FASTER_R50, ROOT, read_jsonl, run_cli, subset_annotations

TRAIN_IMAGES = ["000000114694.jpg", "000000188421.jpg"]


def _train_args(tmp_path: Path, ckpt: Path, work_dir: Path) -> list[str]:
    ann = tmp_path / "ann" / "train.json"
    if not ann.exists():
        subset_annotations(ann, "train2017", TRAIN_IMAGES)
    return [
        "train", "--model", FASTER_R50, "--init-checkpoint", str(ckpt), "--train-ann", str(ann),
        "--train-images", str(COCO / "train2017"), "--work-dir", str(work_dir), "--epochs", "4",
        "--lr", "0.0005", "--warmup-iters", "2", "--flip-prob", "0", "--checkpoint-interval", "1",
        "--eval-interval", "0", *FAST_ARGS,
    ]  # fmt: skip


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["iter"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "train"}


@pytest.mark.slow
def test_training_lowers_loss_and_resume_continues_exactly(
    tmp_path: Path, mmdet_checkpoint: Callable[[str], Path]
) -> None:
    ckpt = mmdet_checkpoint(FASTER_R50)
    # uninterrupted run: 4 epochs x 2 images, batch 1 -> 8 iterations
    full_dir = tmp_path / "full"
    done = run_cli(_train_args(tmp_path, ckpt, full_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    full = _losses(full_dir)
    assert sorted(full) == list(range(1, 9))
    # 2 iterations per epoch: iteration i belongs to epoch (i + 1) // 2 in every record
    records = read_jsonl(full_dir / "metrics.jsonl")
    assert {(r["type"], r["iter"], r["epoch"]) for r in records} == {
        (kind, i, (i + 1) // 2) for kind in ("train", "checkpoint") for i in range(1, 9)
    }
    lines = [line for line in done.stderr.splitlines() if "training.engine: iter " in line]
    assert [line.split("training.engine: ")[1].split("  ")[:2] for line in lines] == [
        [f"iter {i}/8", f"epoch {(i + 1) // 2}/4"] for i in range(1, 9)
    ]
    assert all(" img/s  eta " in line and "MiB (RSS)" in line for line in lines)
    assert "\r" not in done.stderr  # stderr is a pipe: plain lines, no progress bar
    first_epoch, last_epoch = (full[1] + full[2]) / 2, (full[7] + full[8]) / 2
    assert last_epoch < 0.8 * first_epoch, full  # the same 2 images (no flips) 3 epochs later: clearly lower

    # the same run, killed (SIGKILL) once its iteration-3 checkpoint (mid-epoch 2) exists, then resumed
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "training", *_train_args(tmp_path, ckpt, killed_dir)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        latest = killed_dir / "checkpoints" / "iter_00000003.pt"
        while not latest.exists() and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    stopped_at = load_checkpoint(sorted((killed_dir / "checkpoints").glob("iter_*.pt"))[-1])["position"]["iteration"]
    assert stopped_at in range(3, 8)
    resumed = run_cli(["train", "--resume", str(killed_dir)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert f"at iteration {stopped_at}" in resumed.stderr
    after = {i: v for i, v in _losses(killed_dir).items() if i > stopped_at}
    assert sorted(after) == list(range(stopped_at + 1, 9))
    assert after == {i: full[i] for i in after}  # bit-identical losses, across the epoch boundary too
    final_full = load_checkpoint(full_dir / "checkpoints" / "iter_00000008.pt")["model"]
    final_resumed = load_checkpoint(killed_dir / "checkpoints" / "iter_00000008.pt")["model"]
    assert state_digest(final_full) == state_digest(final_resumed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_gloo_keep_identical_weights(
    tmp_path: Path, mmdet_checkpoint: Callable[[str], Path]
) -> None:
    work_dir = tmp_path / "ddp"
    args = _train_args(tmp_path, mmdet_checkpoint(FASTER_R50), work_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "-m", "training", *args, "--max-iters", "2"]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_jsonl(work_dir / "metrics.jsonl")
    ckpts = {r["iter"]: r for r in records if r["type"] == "checkpoint"}
    assert sorted(ckpts) == [1, 2]
    for rec in ckpts.values():
        assert rec["world_size"] == 2
        assert len(rec["rank_digests"]) == 2
        assert rec["rank_digests"][0] == rec["rank_digests"][1]
    assert ckpts[1]["rank_digests"][0] != ckpts[2]["rank_digests"][0]  # the step changed the weights
    saved = load_checkpoint(work_dir / "checkpoints" / "iter_00000002.pt")
    assert state_digest(saved["model"]) == ckpts[2]["rank_digests"][0]
    assert len(saved["rng"]) == 2
    assert not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])
    lr = [r["lr"] for r in records if r["type"] == "train"]
    assert lr == pytest.approx([0.0005 * 0.001, 0.0005 * (0.001 + 0.999 / 2)])  # --lr is absolute, 2 warmup iterations
