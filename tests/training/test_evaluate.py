"""COCO evaluation: the result conversion is exact (GT as detections gives AP 1), and `gnws eval` runs COCOeval."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gnws.cli import main as gnws_main
from training.data import load_coco, segmentation_to_mask
from training.evaluate import coco_eval, detections_to_coco

from .conftest import COCO, FASTER_R50

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
