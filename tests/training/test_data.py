"""COCO dataset and train pipeline on the fixture subset, and the bad-data errors before training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gnws.cli import main as gnws_main
from models.config import COCO_CATEGORY_IDS
from models.preprocess import rescale_size
from training.data import CocoDetection, collate, segmentation_to_mask
from training.errors import DatasetError

from .conftest import COCO, FASTER_R50

TRAIN_ANN = COCO / "annotations" / "instances_train2017.json"
CROWD_IMAGE = "000000204805.jpg"


def dataset(**kw) -> CocoDetection:
    return CocoDetection(TRAIN_ANN, COCO / "train2017", **kw)


def test_categories_crowd_and_filtering() -> None:
    ds = dataset(image_scale=(320, 192))
    assert ds.categories.ids == COCO_CATEGORY_IDS  # the official category list is kept
    index = next(i for i, info in enumerate(ds.images) if info["file_name"] == CROWD_IMAGE)
    anns = ds.coco.imgToAnns[ds.images[index]["id"]]
    assert len(ds.instances(index).labels) == sum(1 for a in anns if not a["iscrowd"]) < len(anns)
    assert sorted(set(ds.aspect_groups())) == [0, 1]


def test_resize_flip_and_masks_stay_aligned() -> None:
    plain = dataset(image_scale=(320, 192), flip_prob=0.0, with_masks=True)
    flipped = dataset(image_scale=(320, 192), flip_prob=1.0, with_masks=True)
    a, b = plain[0], flipped[0]
    h, w = a.img_shape
    assert max(h, w) <= 320
    assert min(h, w) <= 192
    assert (max(h, w) == 320 or min(h, w) == 192)
    assert b.flipped
    assert not a.flipped
    torch.testing.assert_close(b.image_chw, a.image_chw.flip(-1))
    torch.testing.assert_close(b.masks_ghw, a.masks_ghw.flip(-1))
    torch.testing.assert_close(b.boxes_xyxy[:, [0, 2]], w - a.boxes_xyxy[:, [2, 0]])
    for box, mask in zip(a.boxes_xyxy, a.masks_ghw, strict=True):  # each mask lies inside its box
        ys, xs = np.nonzero(mask.numpy())
        assert xs.min() >= box[0].item() - 1
        assert xs.max() <= box[2].item() + 1
        assert ys.min() >= box[1].item() - 1
        assert ys.max() <= box[3].item() + 1


def test_rle_and_polygon_masks_decode_alike() -> None:
    poly = [[10.0, 10.0, 30.0, 10.0, 30.0, 20.0, 10.0, 20.0]]
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects(poly, 40, 50)[0]
    rle["counts"] = rle["counts"].decode()
    m_poly = segmentation_to_mask(poly, 40, 50)
    np.testing.assert_array_equal(segmentation_to_mask(rle, 40, 50), m_poly)
    assert m_poly.sum() > 150


def test_collate_pads_to_multiple_of_32() -> None:
    ds = dataset(image_scale=(320, 192))
    batch = collate([ds[0], ds[1]])
    assert batch.images_nchw.shape[2] % 32 == 0
    assert batch.images_nchw.shape[3] % 32 == 0
    for i, (h, w) in enumerate(batch.img_shapes):
        assert batch.images_nchw[i, :, h:, :].abs().sum() == 0
        assert batch.images_nchw[i, :, :, w:].abs().sum() == 0


def _broken_copy(tmp_path: Path, mutate) -> Path:
    root = tmp_path / "data"
    shutil.copytree(COCO, root)
    mutate(root)
    return root


def _train(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    rc = gnws_main(["train", "--model", FASTER_R50, "--data", str(root), "--work-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before training
    return err


def test_missing_image_is_reported_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _broken_copy(tmp_path, lambda r: (r / "train2017" / "000000188421.jpg").unlink())
    err = _train(root, tmp_path, capsys)
    assert "the training data in" in err
    assert "1 unusable image (1 missing file)" in err
    assert f"000000188421.jpg: not found in {root / 'train2017'}" in err


def test_broken_json_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def truncate(r: Path) -> None:
        ann = r / "annotations" / "instances_train2017.json"
        ann.write_text(ann.read_text()[:500])

    assert "is not valid JSON" in _train(_broken_copy(tmp_path, truncate), tmp_path, capsys)


def test_zero_usable_images_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def only_crowd_free_images(r: Path) -> None:
        ann = r / "annotations" / "instances_train2017.json"
        data = json.loads(ann.read_text())
        data["annotations"] = []
        ann.write_text(json.dumps(data))

    assert "no usable training images" in _train(_broken_copy(tmp_path, only_crowd_free_images), tmp_path, capsys)


def test_missing_annotation_file_raises_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no annotation file"):
        CocoDetection(tmp_path / "nope.json", tmp_path)


def test_broken_val_json_is_reported_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def truncate(r: Path) -> None:
        ann = r / "annotations" / "instances_val2017.json"
        ann.write_text(ann.read_text()[:500])

    err = _train(_broken_copy(tmp_path, truncate), tmp_path, capsys)
    assert "instances_val2017.json is not valid JSON" in err
    assert not (tmp_path / "run").exists()  # not even config.json: nothing was started


def test_missing_val_image_is_reported_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _broken_copy(tmp_path, lambda r: (r / "val2017" / "000000404484.jpg").unlink())
    err = _train(root, tmp_path, capsys)
    assert "the validation data in" in err
    assert "1 unusable image (1 missing file)" in err
    assert "000000404484.jpg: not found in" in err
    assert not (tmp_path / "run").exists()


def test_val_ann_without_val_images_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = gnws_main([
        "train", "--model", FASTER_R50, "--train-ann", str(TRAIN_ANN), "--train-images", str(COCO / "train2017"),
        "--val-ann", str(COCO / "annotations" / "instances_val2017.json"), "--work-dir", str(tmp_path / "run"),
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "--val-ann needs --val-images too" in err
    assert not (tmp_path / "run").exists()


def test_image_entry_without_size_is_a_dataset_error(tmp_path: Path) -> None:
    data = json.loads(TRAIN_ANN.read_text())
    del data["images"][1]["height"]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=rf"1 image entry without a valid id/file_name/width/height .*"
                                           rf"{data['images'][1]['file_name']} lacks height"):  # fmt: skip
        CocoDetection(ann, COCO / "train2017")


def test_multi_scale_picks_one_of_the_scales_per_image_and_epoch() -> None:
    scales = ((320, 192), (256, 128), (160, 96))
    ds = dataset(multi_scale=scales, flip_prob=0.5, with_masks=True)
    fixed = dataset(image_scale=(320, 192), flip_prob=0.5)
    seen = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        fixed.set_epoch(epoch)
        for index in range(len(ds)):
            sample, info = ds[index], ds.images[index]
            expected = {(h, w): s for s in scales for w, h in [rescale_size(info["width"], info["height"], *s)]}
            assert sample.img_shape in expected  # exactly one of the keep-ratio scales
            seen.add(expected[sample.img_shape])
            assert sample.masks_ghw.shape[1:] == sample.img_shape
            assert sample.flipped == fixed[index].flipped  # flips are drawn as without multi-scale
    assert seen == set(scales)


def test_large_scale_jitter_crops_and_pads_to_a_fixed_square() -> None:
    side = 256
    ds = dataset(image_scale=(side, side), scale_jitter=(0.3, 2.0), flip_prob=0.5, with_masks=True)
    shapes, cropped = set(), 0
    for epoch in range(2):
        ds.set_epoch(epoch)
        for index in range(len(ds)):
            s = ds[index]
            h, w = s.img_shape
            assert s.image_chw.shape == (3, side, side)  # every image padded to the same square
            assert h <= side
            assert w <= side
            assert s.image_chw[:, h:, :].abs().sum() == 0
            assert s.image_chw[:, :, w:].abs().sum() == 0
            assert s.masks_ghw.shape == (len(s.boxes_xyxy), h, w)
            boxes = s.boxes_xyxy
            assert bool(((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all())  # no empty box kept
            assert bool((boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all() and (boxes >= 0).all())
            for box, mask in zip(boxes, s.masks_ghw, strict=True):  # the crop moved masks with their boxes
                ys, xs = np.nonzero(mask.numpy())
                if len(xs):
                    assert xs.min() >= box[0].item() - 1
                    assert xs.max() <= box[2].item() + 1
                    assert ys.min() >= box[1].item() - 1
                    assert ys.max() <= box[3].item() + 1
            shapes.add((h, w))
            cropped += max(h, w) == side and len(s.boxes_xyxy) < len(ds.instances(index).labels)
    assert len(shapes) > 4  # the scale varies
    assert cropped > 0  # some crops cut boxes away
    ds.set_epoch(0)
    torch.testing.assert_close(ds[0].image_chw, ds[0].image_chw)  # reproducible from (seed, epoch, image id)
