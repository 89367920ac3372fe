"""Initialisation: label-space adaptation of zoo weights, JHU backbone conversion, offline errors, frozen stages."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from models.config import COCO_CATEGORY_IDS, COCO_CLASSES
from models.errors import CheckpointError, DownloadError
from models.zoo import get_entry
from training import init as init_mod
from training.data import Categories
from training.init import build_initial_model, convert_jhu_backbone, fetch_jhu_backbone, freeze_stages

from .conftest import FASTER_R50


@pytest.fixture(scope="module")
def zoo_state(mmdet_checkpoint: Callable[[str], Path]) -> tuple[Path, dict[str, torch.Tensor]]:
    path = mmdet_checkpoint(FASTER_R50)
    model = build_initial_model(FASTER_R50, "zoo", Categories(COCO_CATEGORY_IDS, COCO_CLASSES), init_checkpoint=path)
    return path, model.state_dict()


def test_subset_of_coco_classes_keeps_pretrained_rows(zoo_state) -> None:
    path, full = zoo_state
    cats = Categories((18, 1), ("dog", "person"))
    model = build_initial_model(FASTER_R50, "zoo", cats, init_checkpoint=path)
    assert model.cfg.classes == ("dog", "person")
    assert model.cfg.category_ids == (18, 1)
    w = model.state_dict()["roi_heads.box_predictor.cls_score.weight"]
    ref = full["roi_heads.box_predictor.cls_score.weight"]
    torch.testing.assert_close(w, ref[[0, 1 + COCO_CLASSES.index("dog"), 1 + COCO_CLASSES.index("person")]])
    reg = model.state_dict()["roi_heads.box_predictor.bbox_pred.weight"]
    dog = 1 + COCO_CLASSES.index("dog")
    torch.testing.assert_close(reg[4:8], full["roi_heads.box_predictor.bbox_pred.weight"][dog * 4 : dog * 4 + 4])


def test_new_classes_recreate_the_predictor_only(zoo_state) -> None:
    path, full = zoo_state
    model = build_initial_model(FASTER_R50, "zoo", Categories((7, 9), ("widget", "gadget")), init_checkpoint=path)
    state = model.state_dict()
    assert state["roi_heads.box_predictor.cls_score.weight"].shape == (3, 1024)
    assert state["roi_heads.box_predictor.bbox_pred.weight"].shape == (12, 1024)
    assert state["roi_heads.box_predictor.cls_score.weight"].std() == pytest.approx(0.01, rel=0.1)
    assert state["roi_heads.box_predictor.bbox_pred.weight"].std() == pytest.approx(0.001, rel=0.1)
    for key in ("backbone.body.layer2.0.conv1.weight", "rpn.head.cls_logits.weight", "roi_heads.box_head.5.weight"):
        torch.testing.assert_close(state[key], full[key])


def test_frozen_stages_one_freezes_stem_and_layer1(zoo_state) -> None:
    model = build_initial_model(FASTER_R50, "scratch", Categories((1,), ("person",)))
    frozen = set(freeze_stages(model, 1))
    assert "backbone.body.conv1.weight" in frozen
    assert "backbone.body.layer1.2.conv3.weight" in frozen
    assert not any(k.startswith(("backbone.body.layer2", "backbone.fpn", "rpn", "roi_heads")) for k in frozen)


def test_jhu_backbone_conversion_is_exact(tmp_path: Path) -> None:
    model = build_initial_model(FASTER_R50, "scratch", Categories((1,), ("person",)))
    body = model.backbone.body.state_dict()
    renamed = {}
    for k, v in body.items():  # mmdetection/JHU naming: gn1, layerX.Y.gnZ, fc head
        k = k.replace("bn1.", "gn1.") if k.startswith("bn1.") else k
        for i in (1, 2, 3):
            k = k.replace(f".bn{i}.", f".gn{i}.")
        renamed[k] = torch.randn_like(v)
    renamed["fc.weight"] = torch.zeros(1000, 2048)
    path = tmp_path / "resnet50_gn_ws.pth"
    torch.save({"state_dict": renamed}, path)
    out = convert_jhu_backbone(path, model.backbone.body)
    torch.testing.assert_close(out["layer3.4.bn2.weight"], renamed["layer3.4.gn2.weight"])
    del renamed["layer4.2.conv3.weight"]
    torch.save(renamed, path)
    with pytest.raises(CheckpointError, match=r"missing layer4\.2\.conv3\.weight"):
        convert_jhu_backbone(path, model.backbone.body)


def test_jhu_backbone_download_fails_clearly_offline(gnws_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(init_mod, "JHU_URL_PREFIX", "http://127.0.0.1:9/")
    with pytest.raises(DownloadError, match="resnet50_gn_ws-15beedd8.pth by hand"):
        fetch_jhu_backbone(get_entry(FASTER_R50).config)
