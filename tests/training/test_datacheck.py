"""The data check before step 1: every reason counted, one-sentence errors, --skip-bad-data, the decode cache."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from gnws.cli import main as gnws_main
from training.checkpoint import load_checkpoint
from training.data import CocoDetection, load_coco
from training.datacheck import (
    BAD_BOX,
    MISSING,
    NO_SEGMENTATION,
    SIZE_MISMATCH,
    UNDECODABLE,
    UNKNOWN_CATEGORY,
    UNKNOWN_IMAGE,
    DecodeCache,
    check_dataset,
    without_excluded,
)

from .conftest import COCO, FAST_ARGS, FASTER_R50

TRAIN_ANN = COCO / "annotations" / "instances_train2017.json"
TRUNCATED = "000000188421.jpg"
ZERO_BOX_IMAGE = "000000425989.jpg"  # 3 boxes: it stays usable without one


def _broken_copy(root: Path) -> tuple[Path, int]:
    """The fixture with a truncated JPEG (its first half) and a box of zero width; returns the root and the box's id."""
    shutil.copytree(COCO, root)
    image = root / "train2017" / TRUNCATED
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    ann_file = root / "annotations" / "instances_train2017.json"
    coco = json.loads(ann_file.read_text())
    image_id = next(i["id"] for i in coco["images"] if i["file_name"] == ZERO_BOX_IMAGE)
    ann = next(a for a in coco["annotations"] if a["image_id"] == image_id and not a["iscrowd"])
    ann["bbox"][2] = 0
    ann_file.write_text(json.dumps(coco))
    return root, ann["id"]


def _train_args(root: Path, run: Path) -> list[str]:
    return ["train", "--model", FASTER_R50, "--data", str(root), "--work-dir", str(run)]


def test_bad_data_stops_the_run_with_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = _broken_copy(tmp_path / "data")
    rc = gnws_main(_train_args(root, tmp_path / "run"))
    err = capsys.readouterr().err
    assert rc == 2, err
    (line,) = [line for line in err.splitlines() if "error:" in line]  # one sentence, no traceback
    assert line.startswith("gnws train: error: the training data in ")
    assert "1 unusable image (1 undecodable image)" in line
    assert "1 unusable annotation (1 zero/negative-size or malformed box)" in line
    assert TRUNCATED in line
    assert ZERO_BOX_IMAGE in line
    assert "--skip-bad-data" in line
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.slow
def test_skip_bad_data_warns_and_leaves_them_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root, box_id = _broken_copy(tmp_path / "data")
    run = tmp_path / "run"
    usable = len(CocoDetection(TRAIN_ANN, COCO / "train2017").images)
    caplog.set_level(logging.INFO)
    rc = gnws_main([
        *_train_args(root, run), "--skip-bad-data", "--init", "scratch", "--max-iters", "1", "--eval-interval", "0",
        *FAST_ARGS,
    ])  # fmt: skip
    assert rc == 0, caplog.text[-3000:]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    (warning,) = [w for w in warnings if w.startswith("--skip-bad-data")]
    assert "leaving out 1 unusable image (1 undecodable image) and 1 unusable annotation" in warning
    assert TRUNCATED in warning
    assert f"annotation {box_id} of {ZERO_BOX_IMAGE}" in warning
    state = load_checkpoint(run / "checkpoints" / "iter_00000001.pt")
    assert state["train_images"] == usable - 1  # the truncated image is not trained on
    cache = json.loads((run / "data_check.json").read_text())["files"]
    assert "truncated" in cache[str((root / "train2017" / TRUNCATED).absolute())]["error"]


def _annotations(tmp_path: Path) -> tuple[Path, Path]:
    """A small annotation file with one instance of every problem, over a copy of 5 fixture images."""
    images = tmp_path / "images"
    shutil.copytree(COCO / "train2017", images)
    data = json.loads(TRAIN_ANN.read_text())
    infos = sorted(data["images"], key=lambda i: i["file_name"])
    anns_of = {
        i["id"]: [a for a in data["annotations"] if a["image_id"] == i["id"] and not a["iscrowd"]] for i in infos
    }
    good, missing, garbage, resized, crowd = (dict(i) for i in infos[:5])
    (images / missing["file_name"]).unlink()
    (images / garbage["file_name"]).write_bytes(b"not an image at all")
    resized["width"] += 10
    anns = [dict(a) for i in (good, missing, garbage, resized) for a in anns_of[i["id"]][:2]]
    bad_box, bad_cat, orphan, no_seg, crowd_ann = (dict(a) for a in anns_of[good["id"]][:1] * 5)
    bad_box.update(id=900_001, bbox=[10, 10, 5, -1])
    bad_cat.update(id=900_002, category_id=12345)
    orphan.update(id=900_003, image_id=987_654)
    no_seg.update(id=900_004, segmentation=[])
    crowd_ann.update(id=900_005, image_id=crowd["id"], iscrowd=1)
    empty = dict(infos[5])  # no annotation at all: left out by the recipe, not an error
    data["images"] = [good, missing, garbage, resized, crowd, empty]
    data["annotations"] = [*anns, bad_box, bad_cat, orphan, no_seg, crowd_ann]
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(data))
    return ann_file, images


def test_every_reason_is_counted_and_excluded(tmp_path: Path) -> None:
    ann_file, images = _annotations(tmp_path)
    coco = load_coco(ann_file)
    report = check_dataset(coco, ann_file, images, split="training", cache=DecodeCache(), with_masks=True)
    assert {k: len(v) for k, v in report.bad_images.items()} == {MISSING: 1, UNDECODABLE: 1, SIZE_MISMATCH: 1}
    assert {k: len(v) for k, v in report.bad_annotations.items()} == {
        BAD_BOX: 1, UNKNOWN_CATEGORY: 1, UNKNOWN_IMAGE: 1, NO_SEGMENTATION: 1,
    }  # fmt: skip
    assert report.excluded_annotation_ids == {900_001, 900_002, 900_003, 900_004}
    assert len(report.excluded_image_ids) == 3
    assert report.filtered["images without annotations (not trained on)"] == 1
    assert report.filtered["crowd-only images (trained as background only)"] == 1
    assert report.checked_files == 5  # the image without annotations is not decoded
    message = report.error_message()
    assert "3 unusable images (1 missing file, 1 undecodable image, 1 size differs from its width/height)" in message
    assert "4 unusable annotations (1 zero/negative-size or malformed box, 1 category id not in categories" in message

    dataset = CocoDetection(
        ann_file, images, coco=coco, with_masks=True,
        exclude_images=report.excluded_image_ids, exclude_annotations=report.excluded_annotation_ids,
    )  # fmt: skip
    assert len(dataset.images) == 2  # the good image and the crowd-only one
    assert not {i["id"] for i in dataset.images} & report.excluded_image_ids

    val = check_dataset(coco, ann_file, images, split="validation", cache=DecodeCache())
    assert val.checked_files == 6  # validation decodes every image
    filtered = without_excluded(coco, val)
    assert len(filtered.getImgIds()) == 3
    assert not set(filtered.getAnnIds()) & val.excluded_annotation_ids


def test_decode_cache_redecodes_only_changed_files(tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(COCO / "train2017", images)
    coco = load_coco(TRAIN_ANN)
    cache_file = tmp_path / "data_check.json"
    first = check_dataset(coco, TRAIN_ANN, images, split="validation", cache=DecodeCache.read(cache_file))
    assert first.decoded == first.checked_files == len(coco.getImgIds())
    cache = DecodeCache.read(cache_file)
    assert cache.entries == {}  # nothing written yet: the caller saves it
    cache = DecodeCache()
    check_dataset(coco, TRAIN_ANN, images, split="validation", cache=cache)
    cache.write(cache_file)
    assert oct(cache_file.stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    again = check_dataset(coco, TRAIN_ANN, images, split="validation", cache=DecodeCache.read(cache_file))
    assert again.decoded == 0
    assert again.ok
    changed = images / TRUNCATED
    data = changed.read_bytes()
    changed.write_bytes(data[: len(data) // 2])
    after = check_dataset(coco, TRAIN_ANN, images, split="validation", cache=DecodeCache.read(cache_file))
    assert after.decoded == 1
    assert list(after.bad_images) == [UNDECODABLE]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
