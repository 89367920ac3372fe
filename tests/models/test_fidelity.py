"""Fidelity against mmdetection's own outputs (``shared/reference``), batch size 1, CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from models.bake import load_model
from models.predictor import Predictor
from models.store import convert_checkpoint
from tests.conftest import FASTER_R50, IMAGES, MASK_R50, REFERENCE_IMAGES, SHARED, reference
from tests.models.matching import match_detections

pytestmark = pytest.mark.slow
INTERMEDIATES = SHARED / "reference/outputs" / FASTER_R50 / "000000010764.intermediates.safetensors"


@pytest.fixture(scope="module")
def unbaked(mmdet_checkpoint):
    """Predictors on the converted (not baked) weights: WS runs in every forward, as in mmcv."""
    out = {}
    for stem in (FASTER_R50, MASK_R50):
        model, info = convert_checkpoint(mmdet_checkpoint(stem), stem)
        out[stem] = Predictor(model=model, info=info, name=stem)
    return out


@pytest.mark.parametrize("stem", [FASTER_R50, MASK_R50])
@pytest.mark.parametrize("image_id", REFERENCE_IMAGES)
def test_reproduces_mmdetection(unbaked, stem: str, image_id: str) -> None:
    ref = reference(stem, image_id)
    predictor = unbaked[stem]
    prepared = predictor.prepare(IMAGES / f"{image_id}.jpg")
    assert list(prepared.ori_shape) == ref["ori_shape"]
    assert list(prepared.img_shape) == ref["img_shape"]
    assert list(prepared.pad_shape) == ref["pad_shape"]
    assert list(prepared.scale_factor) == ref["scale_factor"]
    dets = predictor.encode(predictor.infer([prepared])[0])
    report = match_detections(ref, dets)
    assert report.passes(), report
    assert abs(len(dets) - ref["num_detections"]) <= max(1, ref["num_detections"] // 100)
    # far inside the rule: this port reproduces the reference to float rounding
    assert report.min_iou >= 0.999, report
    assert report.max_score_diff <= 1e-4, report


@pytest.mark.skipif(not INTERMEDIATES.is_file(), reason=f"optional 20 MB intermediates not at {INTERMEDIATES}")
def test_intermediate_tensors(unbaked) -> None:
    from safetensors.torch import load_file

    ref = load_file(str(INTERMEDIATES))
    predictor = unbaked[FASTER_R50]
    prepared = predictor.prepare(IMAGES / "000000010764.jpg")
    images = prepared.image_chw[None]
    assert images.shape == ref["input"].shape
    assert (images - ref["input"]).abs().max().item() <= 1e-6

    model = predictor.model
    with torch.inference_mode():
        feats = model.extract_features(images)
        for key, level in zip(["0", "1", "2", "3", "pool"], ["p2", "p3", "p4", "p5", "p6"], strict=True):
            ours = feats[key][:, :16]
            theirs = ref[f"fpn.{level}.c0_16"]
            assert ours.shape == theirs.shape
            assert (ours - theirs).abs().max().item() <= 1e-3, level
        assert (feats["3"] - ref["fpn.p5"]).abs().max().item() <= 1e-3
        assert (feats["pool"] - ref["fpn.p6"]).abs().max().item() <= 1e-3

        (boxes, scores), = model.propose(feats, [prepared])
        ref_boxes = ref["rpn.proposals"]
        assert boxes.shape == ref_boxes.shape
        # proposals as sets: each of the 1000 reference proposals has a partner with IoU >= 0.99
        # (allowing 1% for near-equal scores at the top-1000 cut), and the partners' scores agree
        iou = torchvision.ops.box_iou(ref_boxes, boxes)
        best_iou, partner = iou.max(dim=1)
        matched = best_iou >= 0.99
        assert matched.sum().item() >= 990, matched.sum().item()
        score_diff = (scores[partner[matched]] - ref["rpn.scores"][matched]).abs().max().item()
        assert score_diff <= 1e-4, score_diff

        # class scores on the reference proposals themselves (background last in mmdet)
        rois = torch.cat([torch.zeros(len(ref_boxes), 1), ref_boxes], dim=1)
        logits, deltas = model.roi_heads.box_forward(feats, rois)
        ours_mmdet_order = torch.cat([logits[:, 1:], logits[:, :1]], dim=1)
        assert (ours_mmdet_order - ref["rcnn.cls_logits"]).abs().max().item() <= 1e-2
        probs = torch.softmax(ours_mmdet_order, dim=1)
        assert (probs - ref["rcnn.cls_scores"]).abs().max().item() <= 1e-4
        assert (deltas[:, 4:] - ref["rcnn.bbox_deltas"]).abs().max().item() <= 1e-3


def test_baked_file_matches_reference(baked_model) -> None:
    """The served artefact (baked .safetensors, no WS modules) reproduces the reference too."""
    path: Path = baked_model(MASK_R50)
    model, info = load_model(path)
    assert model.is_baked
    predictor = Predictor(model=model, info=info, name=MASK_R50)
    ref = reference(MASK_R50, "000000020992")
    report = match_detections(ref, predictor.predict(IMAGES / "000000020992.jpg"))
    assert report.passes(), report
