"""Collective failure handling under DDP: two gloo processes, every rank must raise (none may hang).

Scenarios: replica divergence, an evaluation image that fails on one rank, and a training image that
cannot be read mid-run (it broke after the data check) on one rank: every rank stops with the same sentence.

The two ranks are spawned once for the module and go through the scenarios in the same order;
each rank writes what every scenario returned or raised to a JSON file. The process group has a
short timeout, so a rank left waiting in a collective shows up as a failure, not a hung test.
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import shutil
import socket
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from .conftest import COCO, subset_annotations

WORLD = 2
GOOD_IMAGE = "000000404484.jpg"
TRAIN_IMAGES = ["000000114694.jpg", "000000188421.jpg"]  # sorted by id: rank 0 reads the first, rank 1 the second


class _EmptyDetector(nn.Module):
    """Stands in for a GNWSDetector in ``evaluate``: the right interface, no detections."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = type("Cfg", (), {"category_ids": (1, 18), "size_divisor": 32, "has_mask": False})()

    def forward(self, batch: torch.Tensor, prepared: list[Any]) -> list[dict[str, torch.Tensor]]:
        empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
        return [empty for _ in prepared]


def _outcome(fn: Any) -> dict[str, Any]:
    try:
        return {"value": fn()}
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc), "trace": traceback.format_exc()[-1500:]}


def _rank_main(rank: int, port: int, data: dict[str, str], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=dt.timedelta(seconds=30)
    )
    from torch.utils.data import DataLoader

    from training.cli import default_work_dir
    from training.data import CocoDetection, collate
    from training.engine import next_batch
    from training.evaluate import evaluate
    from training.runtime import DistContext, gather_replica_states
    from training.sampler import GroupedBatchSampler

    ann, images = Path(data["ann"]), Path(data["images"])
    eval_kw: dict[str, Any] = {"image_scale": (192, 128), "device": torch.device("cpu"), "progress": False}
    ctx = DistContext(rank=rank, world_size=WORLD, local_rank=rank, device=torch.device("cpu"))
    results = {
        # each rank's own clock reads a different time: the folder must still be rank 0's
        "work_dir": _outcome(lambda: str(default_work_dir("m", ctx, now=dt.datetime(2024, 1, 1, 0, 0, rank * 7)))),
        "diverged": _outcome(lambda: gather_replica_states(ctx, {"rank": rank}, f"digest{rank}", 5)[1]),
        "agree": _outcome(lambda: gather_replica_states(ctx, {"rank": rank}, "same", 6)[1]),
        # rank 1's only image is corrupt: it fails while rank 0 still has work, then wants to gather
        "eval": _outcome(lambda: evaluate(_EmptyDetector(), ann, images, **eval_kw) is None),
    }
    train_set = CocoDetection(Path(data["train_ann"]), Path(data["train_images"]), image_scale=(192, 128))
    sampler = GroupedBatchSampler(train_set.aspect_groups(), 1, world_size=WORLD, rank=rank, shuffle=False)
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate, num_workers=1)

    def read_all() -> int:
        batches, count = iter(loader), 0
        while next_batch(batches, ctx, iteration=count, run_dir=Path("runs/x")) is not None:
            count += 1
        return count

    results["train_read"] = _outcome(read_all)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("ddp")
    images = root / "images"
    images.mkdir()
    shutil.copyfile(COCO / "val2017" / GOOD_IMAGE, images / GOOD_IMAGE)
    ann = subset_annotations(root / "val.json", "val2017", [GOOD_IMAGE])
    data = json.loads(ann.read_text())
    corrupt = dict(data["images"][0], id=max(i["id"] for i in data["images"]) + 1, file_name="corrupt.jpg")
    data["images"].append(corrupt)  # the higher id: sharded to rank 1
    ann.write_text(json.dumps(data))
    (images / "corrupt.jpg").write_bytes(b"not a jpeg")
    train_images = root / "train_images"
    train_images.mkdir()
    for name in TRAIN_IMAGES:
        shutil.copyfile(COCO / "train2017" / name, train_images / name)
    broken = train_images / TRAIN_IMAGES[1]
    broken.write_bytes(broken.read_bytes()[:2000])  # as if it broke after the data check passed
    train_ann = subset_annotations(root / "train.json", "train2017", TRAIN_IMAGES)
    data = {"ann": str(ann), "images": str(images), "train_ann": str(train_ann), "train_images": str(train_images)}
    spawn = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [spawn.Process(target=_rank_main, args=(r, port, data, str(root))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    if alive:
        pytest.fail(f"{len(alive)} rank(s) still running after 240 s: a collective hung")
    missing = [r for r in range(WORLD) if not (root / f"rank{r}.json").is_file()]
    if missing:
        pytest.fail(f"rank(s) {missing} exited without results (exit codes {[p.exitcode for p in procs]})")
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.slow
def test_default_work_dir_is_rank_zeros_on_every_rank(rank_results: list[dict[str, Any]]) -> None:
    dirs = [r["work_dir"]["value"] for r in rank_results]
    assert dirs == ["runs/m-20240101-000000"] * WORLD


@pytest.mark.slow
def test_replica_divergence_raises_on_every_rank(rank_results: list[dict[str, Any]]) -> None:
    for r in rank_results:
        assert r["diverged"]["error"] == "TrainingError", r["diverged"]
        assert "diverged at iteration 5" in r["diverged"]["message"]
        assert r["agree"] == {"value": ["same", "same"]}


@pytest.mark.slow
def test_eval_failure_on_one_rank_raises_on_every_rank(rank_results: list[dict[str, Any]]) -> None:
    first, second = (r["eval"] for r in rank_results)
    assert second["error"] == "DatasetError", second
    assert "cannot read evaluation image" in second["message"]
    assert "corrupt.jpg" in second["message"]
    assert first["error"] == "DatasetError", first  # rank 0 was fine, but must not wait in the gather
    assert "evaluation failed on rank 1 (of 2)" in first["message"]
    assert "corrupt.jpg" in first["message"]


@pytest.mark.slow
def test_unreadable_training_image_stops_every_rank_with_the_same_sentence(rank_results: list[dict[str, Any]]) -> None:
    first, second = (r["train_read"] for r in rank_results)
    assert first.get("error") == "DatasetError", first
    assert second.get("error") == "DatasetError", second
    assert first["message"] == second["message"]  # the same sentence on every rank
    message = first["message"]
    assert message.startswith("training stopped at iteration 1: reading its data failed on rank 1 of 2 (")
    assert TRAIN_IMAGES[1] in message
    assert "truncated" in message
    assert message.endswith("then continue with --resume runs/x")
