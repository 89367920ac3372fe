"""A list call returns exactly what one-by-one calls return (GN statistics include padding)."""

from __future__ import annotations

import pytest

from models.predictor import Predictor
from tests.conftest import IMAGES, MASK_R50

# two 4:3 images of different sizes sharing one padded shape (batched together), portrait, wide
BATCH = ["000000404484", "000000005001", "000000125952", "000000417285"]


@pytest.mark.slow
def test_list_call_equals_one_by_one(baked_model) -> None:
    predictor = Predictor.load(baked_model(MASK_R50), device="cpu", image_scale=(600, 360))
    paths = [IMAGES / f"{i}.jpg" for i in BATCH]
    prepared = [predictor.prepare(p) for p in paths]
    pad_shapes = [p.pad_shape for p in prepared]
    assert pad_shapes[0] == pad_shapes[1]  # a real multi-image forward pass
    assert len(set(pad_shapes)) >= 3
    batched = predictor.predict(paths)
    single = [predictor.predict(p) for p in paths]
    assert len(batched) == len(single)
    for b, s in zip(batched, single, strict=True):
        assert len(b) > 0
        assert b == s  # same boxes, scores, labels and RLE masks, bit for bit
