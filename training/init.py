"""Initial weights: a zoo checkpoint (fine-tuning), a JHU ImageNet GN+WS backbone, or scratch.

- **zoo**: the mmdetection checkpoint (cached by ``gnws fetch``, fetched when missing) or a file
  given with ``--init-checkpoint``, converted exactly by :mod:`models.mmdet_convert`. The label
  space becomes the dataset's: when the dataset's class names equal the checkpoint's, or are a
  subset of them, the pretrained classifier rows are kept (sliced); otherwise ``box_predictor``
  and ``mask_fcn_logits`` are re-created (mmdetection ``load_from`` with another ``num_classes``
  drops exactly these size-mismatched layers).
- **imagenet**: the ImageNet GN+WS backbones of the WS authors (Qiao et al., JHU) that the GN+WS
  configs name ``open-mmlab://jhu/*``; mmengine's ``hub/openmmlab.json`` resolves them to
  ``https://download.openmmlab.com/pretrain/third_party/<file>`` with the files below, whose name
  suffix is a sha256 prefix (checked like zoo files). Every backbone key must map (``fc`` dropped),
  nothing heuristic. The GN-only ImageNet weights are a different network (no WS) and train worse.
- **scratch**: everything initialised as below.

Initialisation of new layers follows mmdetection's ``init_cfg`` defaults of each module: FPN convs
Xavier-uniform; RPN convs Normal(0.01); ConvModule convs of the heads Kaiming-normal (fan_out); GN
weight 1 / bias 0; ``shared_fcs`` Xavier-uniform; ``fc_cls`` Normal(0.01); ``fc_reg``
Normal(0.001); mask ``upsample``/``conv_logits`` Kaiming-normal fan_out; every bias 0.
``frozen_stages=1`` (the configs' value) freezes the stem and ``layer1``. The project's notes on the
recipe are in ``docs/mmdetection-fidelity.md``, section "Training recipe".
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import torch
from torch import nn

from models.bake import load_model
from models.config import DetectorConfig
from models.detector import GNWSDetector, build_detector
from models.errors import CheckpointError, DownloadError
from models.fetch import download, fetch
from models.store import checkpoint_dir, checkpoint_path, convert_checkpoint
from models.zoo import get_entry, with_classes

from .data import Categories
from .errors import TrainConfigError

logger = logging.getLogger(__name__)

JHU_URL_PREFIX = "https://download.openmmlab.com/pretrain/third_party/"
# (depth, groups, width_per_group) -> file; the suffix is the sha256 prefix
JHU_BACKBONES: dict[tuple[int, int, int], str] = {
    (50, 1, 64): "resnet50_gn_ws-15beedd8.pth",
    (101, 1, 64): "resnet101_gn_ws-3e3c308c.pth",
    (50, 32, 4): "resnext50_32x4d_gn_ws-0d87ac85.pth",
    (101, 32, 4): "resnext101_32x4d_gn_ws-34ac1a9e.pth",
}


def _kaiming(conv: nn.Module | torch.Tensor) -> None:
    if not isinstance(conv, nn.Module):  # submodule attributes are typed Tensor | Module
        raise TypeError(f"expected a conv module, got a {type(conv).__name__}")
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # type: ignore[arg-type]
    if getattr(conv, "bias", None) is not None:
        nn.init.zeros_(conv.bias)  # type: ignore[arg-type]


def _init_norms(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_box_predictor(detector: GNWSDetector) -> None:
    pred = detector.roi_heads.box_predictor
    nn.init.normal_(pred.cls_score.weight, std=0.01)
    nn.init.zeros_(pred.cls_score.bias)
    nn.init.normal_(pred.bbox_pred.weight, std=0.001)
    nn.init.zeros_(pred.bbox_pred.bias)


def init_mask_logits(detector: GNWSDetector) -> None:
    if detector.roi_heads.mask_predictor is not None:
        _kaiming(detector.roi_heads.mask_predictor.mask_fcn_logits)


def init_detector_weights(detector: GNWSDetector, *, backbone_body: bool) -> None:
    """mmdetection's initialisation of every layer (and of the ResNet body when ``backbone_body``)."""
    if backbone_body:
        for m in detector.backbone.body.modules():
            if isinstance(m, nn.Conv2d):
                _kaiming(m)
        _init_norms(detector.backbone.body)
    for m in detector.backbone.fpn.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    _init_norms(detector.backbone.fpn)
    for m in detector.rpn.head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)  # type: ignore[arg-type]
    heads = detector.roi_heads
    for m in heads.box_head.modules():
        if isinstance(m, nn.Conv2d):
            _kaiming(m)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    _init_norms(heads.box_head)
    init_box_predictor(detector)
    if heads.mask_head is not None and heads.mask_predictor is not None:
        for m in heads.mask_head.modules():
            if isinstance(m, nn.Conv2d):
                _kaiming(m)
        _init_norms(heads.mask_head)
        _kaiming(heads.mask_predictor.conv5_mask)
        _kaiming(heads.mask_predictor.mask_fcn_logits)


def freeze_stages(detector: GNWSDetector, frozen_stages: int) -> list[str]:
    """mmdetection ``ResNet._freeze_stages``: stem (conv1 + norm) and ``layer1..layerN`` get no grads."""
    body = detector.backbone.body
    frozen: list[nn.Module] = []
    if frozen_stages >= 0:
        frozen += [body.conv1, body.bn1]
    frozen += [getattr(body, f"layer{i}") for i in range(1, frozen_stages + 1)]
    names = []
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    for name, p in detector.named_parameters():
        if not p.requires_grad:
            names.append(name)
    return names


def _slice_rows(t: torch.Tensor, keep: list[int], width: int) -> torch.Tensor:
    """Rows of background (block 0) + class blocks ``keep`` (0-based labels), each ``width`` rows."""
    blocks = [0] + [k + 1 for k in keep]
    return torch.cat([t[b * width : (b + 1) * width] for b in blocks], dim=0)


def adapt_label_space(detector: GNWSDetector, categories: Categories) -> GNWSDetector:
    """A detector for the dataset's categories, keeping every pretrained weight that still fits."""
    old = detector.cfg
    cfg = with_classes(old, categories.names, categories.ids)
    if old.classes == cfg.classes:
        if old.category_ids != cfg.category_ids:
            logger.info("same class names as the checkpoint; category ids taken from the dataset")
        new = build_detector(cfg)
        new.load_state_dict(detector.state_dict(), strict=True)
        return new
    new = build_detector(cfg)
    state = detector.state_dict()
    predictor_keys = [
        k for k in state if k.startswith(("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits."))
    ]
    index = {name: i for i, name in enumerate(old.classes)}
    if all(name in index for name in cfg.classes):
        keep = [index[name] for name in cfg.classes]
        logger.info(
            "dataset classes are a subset of the checkpoint's: keeping %d of %d classifier rows",
            len(keep),
            len(old.classes),
        )
        for k in predictor_keys:
            width = 4 if "bbox_pred" in k else 1
            state[k] = _slice_rows(state[k], keep, width)
        new.load_state_dict(state, strict=True)
        return new
    logger.info(
        "dataset classes differ from the checkpoint's (%d vs %d): re-creating box_predictor and mask logits",
        len(cfg.classes),
        len(old.classes),
    )
    fresh = new.state_dict()
    for k in predictor_keys:
        state[k] = fresh[k]
    new.load_state_dict(state, strict=True)
    init_box_predictor(new)
    init_mask_logits(new)
    return new


def _load_init_checkpoint(cfg: DetectorConfig, model_key: str, path: Path | None) -> GNWSDetector:
    if path is None:
        path = checkpoint_path(get_entry(model_key))
        if not path.is_file():
            logger.info("zoo checkpoint for %s not cached; fetching it", model_key)
            path = fetch(model_key)
    if path.suffix == ".safetensors":
        model, info = load_model(path)
        if info.baked:
            logger.warning(
                "%s is baked (WS folded into the kernels); WS is re-applied on top, which changes the "
                "kernels only by the eps term. Prefer the unbaked checkpoint.",
                path,
            )
            state = model.state_dict()
            model = build_detector(info.config)
            model.load_state_dict(state, strict=True)
    else:
        model, info = convert_checkpoint(path, model_key)
    arch = {f: getattr(cfg, f) for f in ("arch", "depth", "groups", "width_per_group")}
    found = {f: getattr(info.config, f) for f in arch}
    if arch != found:
        raise CheckpointError(
            f"{path} holds a {found} model but --model {model_key} is {arch}; pick the matching --model"
        )
    return model


def fetch_jhu_backbone(cfg: DetectorConfig) -> Path:
    """The cached JHU ImageNet GN+WS backbone for ``cfg`` (downloaded and sha256-checked if missing)."""
    name = JHU_BACKBONES.get((cfg.depth, cfg.groups, cfg.width_per_group))
    if name is None:
        raise TrainConfigError(f"no JHU ImageNet GN+WS backbone for depth {cfg.depth}, groups {cfg.groups}")
    dest = checkpoint_dir() / name
    if dest.is_file():
        return dest
    url = JHU_URL_PREFIX + name
    prefix = name.rsplit("-", 1)[1].removesuffix(".pth")
    try:
        return download(url, dest, sha256_prefix=prefix)
    except DownloadError as exc:
        raise DownloadError(f"{exc}; download {url} by hand and place it at {dest} (or set GNWS_HOME)") from None


def convert_jhu_backbone(path: Path, body: nn.Module) -> dict[str, torch.Tensor]:
    """Map a JHU/open-mmlab ResNet(-X) GN+WS state dict exactly onto torchvision's ResNet body."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable backbone checkpoint: {exc}") from None
    raw = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds no state dict")
    target = body.state_dict()
    out: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, value in raw.items():
        k = re.sub(r"^(module\.)?(backbone\.)?", "", str(key))
        if k.startswith("fc."):
            continue  # ImageNet classifier
        k = re.sub(r"^gn1\.", "bn1.", k)
        k = re.sub(r"\.gn(\d)\.", r".bn\1.", k)
        if k not in target:
            problems.append(f"unexpected key {key}")
        elif tuple(value.shape) != tuple(target[k].shape):
            problems.append(f"shape of {key} is {tuple(value.shape)}, {k} needs {tuple(target[k].shape)}")
        else:
            out[k] = value.float()
    problems += [f"missing {k}" for k in target if k not in out]
    if problems:
        raise CheckpointError(
            f"{path} does not match the backbone exactly ({len(problems)} problems): " + "; ".join(problems[:20])
        )
    return out


def build_initial_model(
    model_key: str, init: str, categories: Categories, *, init_checkpoint: Path | None = None
) -> GNWSDetector:
    """The detector a run starts from, with the dataset's label space (WS convs, float32, CPU)."""
    entry = get_entry(model_key)
    if init == "zoo":
        return adapt_label_space(_load_init_checkpoint(entry.config, model_key, init_checkpoint), categories)
    cfg = dataclasses.replace(with_classes(entry.config, categories.names, categories.ids))
    detector = build_detector(cfg)
    init_detector_weights(detector, backbone_body=init == "scratch")
    if init == "imagenet":
        path = init_checkpoint or fetch_jhu_backbone(cfg)
        detector.backbone.body.load_state_dict(convert_jhu_backbone(path, detector.backbone.body), strict=True)
    elif init != "scratch":
        raise TrainConfigError(f"init must be zoo, imagenet or scratch, got {init!r}")
    return detector


def set_image_scale(detector: GNWSDetector, image_scale: tuple[int, int]) -> None:
    """Record the ``(max_side, min_side)`` the run trains at as the detector's inference scale."""
    cfg = dataclasses.replace(detector.cfg, max_size=image_scale[0], min_size=image_scale[1])
    detector.cfg = detector.rpn.cfg = detector.roi_heads.cfg = cfg
