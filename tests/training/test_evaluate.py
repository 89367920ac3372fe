"""COCO evaluation: the result conversion is exact (GT as detections gives AP 1, per category too), and
`gnws eval` runs COCOeval on any model reference, prints per-category AP and draws the detections."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from gnws.cli import main as gnws_main
from models.errors import CheckpointError, WeightsNotFoundError
from training.cli import load_for_eval
from training.data import load_coco, segmentation_to_mask
from training.evaluate import coco_eval, detections_to_coco, format_per_class

from .conftest import COCO, FASTER_R50, MASK_R50

VAL_ANN = COCO / "annotations" / "instances_val2017.json"


def test_ground_truth_as_detections_scores_ap_one() -> None:
    coco = load_coco(VAL_ANN)
    cat_ids = tuple(sorted(coco.getCatIds()))
    results = []
    for image_id in coco.getImgIds():
        info = coco.imgs[image_id]
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        h, w = info["height"], info["width"]
        masks = torch.stack([torch.from_numpy(segmentation_to_mask(a["segmentation"], h, w)).bool() for a in anns])
        labels = torch.tensor([cat_ids.index(a["category_id"]) for a in anns])
        det = {"boxes": boxes, "scores": torch.ones(len(anns)), "labels": labels, "masks": masks}
        results.extend(detections_to_coco(image_id, det, cat_ids))
    result = coco_eval(coco, results, ("bbox", "segm"))
    assert result.metrics["bbox_mAP"] == pytest.approx(1.0, abs=1e-3)
    assert result.metrics["segm_mAP"] == pytest.approx(1.0, abs=1e-3)
    assert "Average Precision" in result.summaries["segm"]
    assert coco_eval(coco, [], ("bbox",)).metrics["bbox_mAP"] == 0.0
    present = {coco.cats[a["category_id"]]["name"] for a in coco.dataset["annotations"] if not a["iscrowd"]}
    for iou_type in ("bbox", "segm"):
        per_class = dict(result.per_class[iou_type])
        assert len(per_class) == len(cat_ids)
        assert {name for name, ap in per_class.items() if not math.isnan(ap)} >= present
        assert all(per_class[name] == pytest.approx(1.0, abs=1e-3) for name in present)
    table = format_per_class(result, "bbox")
    assert all(f"{name} " in table for name in present)
    assert "100.00" in table
    assert "categories without ground truth in this set not shown" in table


def test_per_class_ap_drops_when_one_category_is_missed() -> None:
    coco = load_coco(VAL_ANN)
    cat_ids = tuple(sorted(coco.getCatIds()))
    anns = [a for a in coco.dataset["annotations"] if not a["iscrowd"]]
    missed = max({a["category_id"] for a in anns}, key=lambda c: sum(a["category_id"] == c for a in anns))
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in anns if a["category_id"] != missed
    ]  # fmt: skip
    per_class = dict(coco_eval(coco, results, ("bbox",)).per_class["bbox"])
    assert per_class[coco.cats[missed]["name"]] == 0.0
    assert all(ap == pytest.approx(1.0, abs=1e-3) for name, ap in per_class.items()
               if name != coco.cats[missed]["name"] and not math.isnan(ap))  # fmt: skip
    assert len(cat_ids) == len(per_class)


def test_eval_references_go_to_the_right_loader(tmp_path: Path, gnws_home: Path) -> None:
    with pytest.raises(CheckpointError, match="no training checkpoint at"):
        load_for_eval(str(tmp_path / "run" / "checkpoints" / "iter_00000001.pt"), None)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="is not a gnws training checkpoint"):
        load_for_eval(str(tmp_path / "other.pt"), None)
    (tmp_path / "zoo.pth").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"mmdetection checkpoint: say which zoo architecture it is \(--model"):
        load_for_eval(str(tmp_path / "zoo.pth"), None)
    with pytest.raises(WeightsNotFoundError):  # a zoo key whose checkpoint is not cached (empty GNWS_HOME)
        load_for_eval(FASTER_R50, None)


@pytest.mark.slow
def test_gnws_eval_prints_the_ap_table(
    mmdet_checkpoint: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = mmdet_checkpoint(FASTER_R50)
    rc = gnws_main(["eval", "--model", FASTER_R50, "--checkpoint", str(ckpt), "--data", str(COCO),
                    "--image-scale", "320", "192", "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "Evaluated 4 images" in out
    assert out.count("Average Precision") == 6
    assert "bbox_mAP=" in out
    assert "per-category bbox AP:" in out


@pytest.mark.slow
def test_gnws_eval_takes_a_model_store_name_and_draws(
    tmp_path: Path, gnws_home: Path, baked_model: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    store = gnws_home / "models"
    store.mkdir(parents=True)
    shutil.copyfile(baked_model(MASK_R50), store / "my-model.safetensors")  # test_export bakes it too
    draw = tmp_path / "drawn"
    rc = gnws_main(["eval", "--checkpoint", "my-model", "--data", str(COCO), "--image-scale", "320", "192",
                    "--device", "cpu", "--draw", str(draw), "--draw-score-threshold", "0.0"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("Average Precision") == 12  # bbox and segm
    assert "per-category segm AP:" in out
    names = sorted(p.name for p in (COCO / "val2017").iterdir())
    assert sorted(p.name for p in draw.iterdir()) == names
    assert f"drew {len(names)} images into {draw}" in out
    for name in names:
        with Image.open(draw / name) as drawn, Image.open(COCO / "val2017" / name) as original:
            assert drawn.size == original.size
            assert drawn.convert("RGB").tobytes() != original.convert("RGB").tobytes()  # something was drawn
