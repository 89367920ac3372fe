"""A list call returns exactly what one-by-one calls return (GN statistics include padding)."""

from __future__ import annotations

import pytest

from models.predictor import Predictor
from tests.conftest import IMAGES, MASK_R50
from tests.models.matching import match_detections

# two 4:3 images of different sizes sharing one padded shape, portrait, wide
BATCH = ["000000404484", "000000005001", "000000125952", "000000417285"]


def _as_reference(dets: list[dict]) -> dict:
    return {
        "bboxes": [d["bbox_xyxy"] for d in dets], "scores": [d["score"] for d in dets],
        "category_ids": [d["category_id"] for d in dets], "masks": [d["segmentation"] for d in dets],
    }


@pytest.mark.slow
def test_list_call_equals_one_by_one(baked_model) -> None:
    predictor = Predictor.load(baked_model(MASK_R50), device="cpu", image_scale=(600, 360))
    assert predictor.batched_forward is False  # the CPU default
    paths = [IMAGES / f"{i}.jpg" for i in BATCH]
    batched = predictor.predict(paths)
    single = [predictor.predict(p) for p in paths]
    assert len(batched) == len(single)
    for b, s in zip(batched, single, strict=True):
        assert len(b) > 0
        assert b == s  # same boxes, scores, labels and RLE masks, bit for bit

    # A real multi-image forward pass (the CUDA default) agrees within float rounding, and never
    # mixes padded shapes: images of another padded shape are not in the same pass.
    predictor.batched_forward = True
    prepared = [predictor.prepare(p) for p in paths]
    assert prepared[0].pad_shape == prepared[1].pad_shape
    assert len({p.pad_shape for p in prepared}) == 3
    forward_batches: list[int] = []
    handle = predictor.model.backbone.register_forward_hook(lambda m, i, o: forward_batches.append(i[0].shape[0]))
    try:
        together = [predictor.encode(r) for r in predictor.infer(prepared)]
    finally:
        handle.remove()
    assert sorted(forward_batches) == [1, 1, 2]
    for t, s in zip(together, single, strict=True):
        report = match_detections(_as_reference(s), t)
        assert report.passes(), report
