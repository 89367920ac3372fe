"""Mask R-CNN fine-tuning → evaluation → `gnws export` (store versions) → predictor and the service's hot reload."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gnws.cli import main as gnws_main
from models import Predictor, read_model_info
from models.store import list_versions, version_path
from tests.conftest import IMAGES

from .conftest import COCO, FAST_ARGS, MASK_R50, read_jsonl, subset_annotations

NAME = "mask_finetuned"


@pytest.mark.slow
def test_export_loads_in_predictor_and_serves_after_reload(
    tmp_path: Path, gnws_home: Path, mmdet_checkpoint: Callable[[str], Path], baked_model: Callable[[str], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    train_ann = subset_annotations(tmp_path / "ann" / "train.json", "train2017", ["000000114694.jpg"])
    val_ann = subset_annotations(tmp_path / "ann" / "val.json", "val2017", ["000000404484.jpg"])
    run_dir = tmp_path / "runs" / "mask-run"
    rc = gnws_main([
        "train", "--model", MASK_R50, "--init-checkpoint", str(mmdet_checkpoint(MASK_R50)),
        "--train-ann", str(train_ann), "--train-images", str(COCO / "train2017"),
        "--val-ann", str(val_ann), "--val-images", str(COCO / "val2017"),
        "--work-dir", str(run_dir), "--max-iters", "1", "--lr", "0.0005", *FAST_ARGS,
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err[-3000:]
    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if r["type"] == "train"]
    assert train
    assert train[0]["loss_mask"] > 0
    val = [r for r in records if r["type"] == "val"]
    assert len(val) == 1
    assert {"bbox_mAP", "segm_mAP"} <= set(val[0])
    assert val[0]["bbox_mAP"] == 0.0  # the fixture weights find nothing at this scale after one step
    assert not (run_dir / "checkpoints" / "best.pt").exists()  # so there is no "best": the latest is exported

    store = gnws_home / "models"
    store.mkdir(parents=True)
    shutil.copyfile(baked_model(MASK_R50), store / f"{NAME}.safetensors")  # what the service starts with

    from fastapi.testclient import TestClient

    from service import Settings, create_app  # the service is another package; tests may use both

    settings = Settings(detect_model="none", segment_model=str(store / f"{NAME}.safetensors"), device="cpu",
                        image_scale=(320, 192), api_key="k", model_store=store, warmup=False)  # fmt: skip
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 180
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "service did not become ready"
            time.sleep(0.2)

        assert gnws_main(["export", str(run_dir), "--name", NAME]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        assert out[-2:] == [f"version 1 of {NAME}", str(store / NAME / "1.safetensors")]
        exported = Path(out[-1])
        info = read_model_info(exported)
        assert info.baked
        assert info.config.arch == "mask_rcnn"
        assert (info.config.max_size, info.config.min_size) == (192, 128)  # the scale it was trained at
        prov = info.provenance
        assert prov["source"] == "gnws-train"
        assert (prov["name"], prov["version"], prov["checkpoint"]) == (NAME, 1, "iter_00000001.pt")
        assert prov["schedule"]["name"] == "2x"
        assert prov["data"]["train_ann_sha256"]
        assert prov["metrics"]["segm_mAP"] == val[0]["segm_mAP"]  # from metrics.jsonl, there being no best.pt

        predictor = Predictor.load(exported, device="cpu")
        detections = predictor.predict(IMAGES / "000000404484.jpg")
        assert isinstance(detections, list)
        assert all("segmentation" in d for d in detections)

        r = client.post(f"/v1/models/{NAME}/reload", headers={"X-API-Key": "k"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["previous_generation"] == 0
        assert body["previous_source_sha256"] != info.source_sha256
        served = client.get("/v1/models").json()["models"]
        assert any(m["name"] == NAME and m["source_sha256"] == info.source_sha256 for m in served), served
        with open(IMAGES / "000000404484.jpg", "rb") as f:
            r = client.post("/v1/segment", files={"file": ("a.jpg", f, "image/jpeg")})
        assert r.status_code == 200, r.text

    # each export is a new version; the newest --keep-versions stay
    for _ in range(2):
        assert gnws_main(["export", str(run_dir), "--name", NAME, "--keep-versions", "2"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-2:] == [f"version 3 of {NAME}", str(version_path(NAME, 3))]
    assert list_versions(NAME) == [2, 3]
    assert read_model_info(version_path(NAME, 3)).provenance["version"] == 3


def test_export_refuses_names_that_are_no_model_store_names(
    tmp_path: Path, gnws_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({
        "model": MASK_R50, "work_dir": str(run_dir), "train_ann": "a.json", "train_images": "images",
    }))  # fmt: skip
    for name, expected in ((MASK_R50, "is a zoo key"), ("../escape", "cannot name a model in the store")):
        assert gnws_main(["export", str(run_dir), "--name", name]) == 2
        assert expected in capsys.readouterr().err
    assert gnws_main(["export", str(run_dir), "--name", "ok", "--keep-versions", "0"]) == 2
    assert "--keep-versions must be >= 1" in capsys.readouterr().err
    assert not (gnws_home / "models").exists()
