"""A short torchrun training on CUDA with bf16 autocast (skipped without a GPU)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from training.checkpoint import load_checkpoint

from .conftest import COCO, FAST_ARGS, FASTER_R50, ROOT, read_jsonl, subset_annotations

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_torchrun_bf16_trains_with_finite_loss_and_checkpoints(
    tmp_path: Path, mmdet_checkpoint: Callable[[str], Path]
) -> None:
    ann = subset_annotations(tmp_path / "train.json", "train2017", ["000000114694.jpg", "000000188421.jpg"])
    work_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "training",
        "train", "--model", FASTER_R50, "--init-checkpoint", str(mmdet_checkpoint(FASTER_R50)),
        "--train-ann", str(ann), "--train-images", str(COCO / "train2017"), "--work-dir", str(work_dir),
        "--device", "cuda", "--amp", "bf16", "--max-iters", "6", "--lr", "0.0005", "--warmup-iters", "2",
        "--eval-interval", "0", *FAST_ARGS,
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    train = [r for r in read_jsonl(work_dir / "metrics.jsonl") if r["type"] == "train"]
    assert [r["iter"] for r in train] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) for r in train), train
    assert all(r["images_per_s"] > 0 and r["max_mem_mib"] > 0 for r in train), train
    assert "peak GPU memory" in done.stderr
    state = load_checkpoint(work_dir / "checkpoints" / "iter_00000006.pt")
    assert state["position"]["iteration"] == 6
    assert json.loads(state["config"])["amp"] == "bf16"
