"""Exact conversion of mmdetection GN+WS checkpoints to this project's state dict.

Key mapping (docs/mmdetection-fidelity.md, 'Checkpoint conversion') is a fixed list of anchored
rules, no heuristics: every source key must match exactly one rule, every target key must be
filled, and shapes must be equal after the class-layout change, otherwise one
:class:`ConversionError` lists every offender. Class layout: mmdetection puts background **last**
in ``fc_cls`` (81) and has no background slot in ``fc_reg`` (320) or ``conv_logits`` (80);
torchvision's heads put background at index 0, so ``fc_cls`` rows are rotated and zero background
slots are inserted.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .config import COCO_CATEGORY_IDS, COCO_CLASSES, DetectorConfig
from .detector import build_detector
from .errors import CheckpointError, ConversionError
from .files import file_sha256

logger = logging.getLogger(__name__)

_RULES: tuple[tuple[str, str], ...] = (
    (r"backbone\.conv1\.weight", r"backbone.body.conv1.weight"),
    (r"backbone\.gn1\.(weight|bias)", r"backbone.body.bn1.\1"),
    (r"backbone\.(layer\d+\.\d+)\.conv(\d)\.weight", r"backbone.body.\1.conv\2.weight"),
    (r"backbone\.(layer\d+\.\d+)\.gn(\d)\.(weight|bias)", r"backbone.body.\1.bn\2.\3"),
    (r"backbone\.(layer\d+\.0)\.downsample\.0\.weight", r"backbone.body.\1.downsample.0.weight"),
    (r"backbone\.(layer\d+\.0)\.downsample\.1\.(weight|bias)", r"backbone.body.\1.downsample.1.\2"),
    (r"neck\.lateral_convs\.(\d)\.conv\.weight", r"backbone.fpn.inner_blocks.\1.0.weight"),
    (r"neck\.lateral_convs\.(\d)\.gn\.(weight|bias)", r"backbone.fpn.inner_blocks.\1.1.\2"),
    (r"neck\.fpn_convs\.(\d)\.conv\.weight", r"backbone.fpn.layer_blocks.\1.0.weight"),
    (r"neck\.fpn_convs\.(\d)\.gn\.(weight|bias)", r"backbone.fpn.layer_blocks.\1.1.\2"),
    (r"rpn_head\.rpn_conv\.(weight|bias)", r"rpn.head.conv.0.0.\1"),
    (r"rpn_head\.rpn_cls\.(weight|bias)", r"rpn.head.cls_logits.\1"),
    (r"rpn_head\.rpn_reg\.(weight|bias)", r"rpn.head.bbox_pred.\1"),
    (r"roi_head\.bbox_head\.shared_convs\.(\d)\.conv\.weight", r"roi_heads.box_head.\1.0.weight"),
    (r"roi_head\.bbox_head\.shared_convs\.(\d)\.gn\.(weight|bias)", r"roi_heads.box_head.\1.1.\2"),
    (r"roi_head\.bbox_head\.shared_fcs\.0\.(weight|bias)", r"roi_heads.box_head.5.\1"),
    (r"roi_head\.bbox_head\.fc_cls\.(weight|bias)", r"roi_heads.box_predictor.cls_score.\1"),
    (r"roi_head\.bbox_head\.fc_reg\.(weight|bias)", r"roi_heads.box_predictor.bbox_pred.\1"),
    (r"roi_head\.mask_head\.convs\.(\d)\.conv\.weight", r"roi_heads.mask_head.\1.0.weight"),
    (r"roi_head\.mask_head\.convs\.(\d)\.gn\.(weight|bias)", r"roi_heads.mask_head.\1.1.\2"),
    (r"roi_head\.mask_head\.upsample\.(weight|bias)", r"roi_heads.mask_predictor.conv5_mask.\1"),
    (r"roi_head\.mask_head\.conv_logits\.(weight|bias)", r"roi_heads.mask_predictor.mask_fcn_logits.\1"),
)
_COMPILED = tuple((re.compile(pattern), repl) for pattern, repl in _RULES)


def _background_last_to_first(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t[-1:], t[:-1]], dim=0)


def _prepend_zero_background(width: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def transform(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t.new_zeros((width, *t.shape[1:])), t], dim=0)

    return transform


_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "roi_heads.box_predictor.cls_score": _background_last_to_first,
    "roi_heads.box_predictor.bbox_pred": _prepend_zero_background(4),
    "roi_heads.mask_predictor.mask_fcn_logits": _prepend_zero_background(1),
}


def map_mmdet_key(key: str) -> str | None:
    """Target key for an mmdetection key, or ``None`` when no rule matches."""
    for pattern, repl in _COMPILED:
        if pattern.fullmatch(key):
            return pattern.sub(repl, key)
    return None


@dataclass(frozen=True)
class MMDetCheckpoint:
    """An mmdetection checkpoint read from disk."""

    state_dict: dict[str, torch.Tensor]
    classes: tuple[str, ...] | None
    sha256: str
    path: Path


def read_mmdet_checkpoint(path: str | Path, *, trusted_sha256_prefix: str | None = None) -> MMDetCheckpoint:
    """Read an mmdetection ``.pth`` safely.

    ``torch.load(weights_only=True)`` first. Only the published zoo checkpoint of the model being
    converted (its sha256 starts with ``trusted_sha256_prefix``) may fall back to full unpickling
    (its ``meta`` can hold arbitrary objects); anything else must be a plain tensor checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    sha = file_sha256(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not (trusted_sha256_prefix and sha.startswith(trusted_sha256_prefix)):
            raise CheckpointError(
                f"{path} holds Python objects that are unsafe to load ({_first_line(exc)}); only published "
                "zoo checkpoints (sha256-verified) are unpickled fully. Re-save it as a plain state_dict."
            ) from None
        logger.info("%s matches a zoo sha256; loading with weights_only=False", path)
        obj = _load_trusted(path)
    except Exception as exc:  # torch raises RuntimeError/EOFError/OSError/... for broken files
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {_first_line(exc)}. "
            "Download it again with `gnws fetch NAME`."
        ) from None
    state_dict, classes = _split_checkpoint(obj, path)
    return MMDetCheckpoint(state_dict=state_dict, classes=classes, sha256=sha, path=path)


def _load_trusted(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path} could not be loaded: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _split_checkpoint(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], tuple[str, ...] | None]:
    if isinstance(obj, Mapping) and "state_dict" in obj:
        raw = obj["state_dict"]
        meta = obj.get("meta") or {}
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raw, meta = obj, {}
    else:
        found = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path} is not an mmdetection checkpoint: expected a dict with 'state_dict' (and 'meta'), found {found}"
        )
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path}: 'state_dict' is not a mapping of tensors")
    state_dict = {re.sub(r"^module\.", "", str(k)): v for k, v in raw.items()}
    classes = None
    if isinstance(meta, Mapping):
        found_classes = meta.get("CLASSES") or (meta.get("dataset_meta") or {}).get("classes")
        if found_classes:
            classes = tuple(str(c) for c in found_classes)
    return state_dict, classes


def config_for_checkpoint(base: DetectorConfig, ckpt: MMDetCheckpoint) -> DetectorConfig:
    """``base`` with the label space of the checkpoint (COCO ids when the names are COCO's)."""
    fc_cls = ckpt.state_dict.get("roi_head.bbox_head.fc_cls.weight")
    num_classes = fc_cls.shape[0] - 1 if fc_cls is not None else base.num_classes
    classes = ckpt.classes
    if classes is None or tuple(classes) == COCO_CLASSES:
        if num_classes == len(COCO_CLASSES):
            return replace(base, classes=COCO_CLASSES, category_ids=COCO_CATEGORY_IDS)
        classes = classes or tuple(f"class_{i}" for i in range(num_classes))
    if len(classes) != num_classes:
        raise ConversionError(
            f"{ckpt.path}: meta lists {len(classes)} classes but fc_cls has {num_classes} (+1 background) outputs"
        )
    return replace(base, classes=tuple(classes), category_ids=tuple(range(1, num_classes + 1)))


def convert_mmdet_state_dict(source: Mapping[str, torch.Tensor], cfg: DetectorConfig) -> dict[str, torch.Tensor]:
    """Map an mmdetection state dict onto ``build_detector(cfg)``'s keys, exactly.

    Raises:
        ConversionError: listing every unmapped or duplicated source key, every unfilled target
            key and every shape mismatch.
    """
    with torch.device("meta"):  # shapes only: no memory, no random init
        target_shapes = {k: tuple(v.shape) for k, v in build_detector(cfg).state_dict().items()}
    converted: dict[str, torch.Tensor] = {}
    claimed: set[str] = set()
    problems: list[str] = []
    for key, tensor in source.items():
        target = map_mmdet_key(key)
        if target is None:
            problems.append(f"unexpected source key {key} {tuple(tensor.shape)}")
            continue
        if target not in target_shapes:
            problems.append(f"source key {key} maps to {target}, which this architecture does not have")
            continue
        if target in claimed:
            problems.append(f"two source keys map to {target}")
            continue
        claimed.add(target)
        transform = _TRANSFORMS.get(target.rsplit(".", 1)[0])
        value = transform(tensor) if transform else tensor
        if tuple(value.shape) != target_shapes[target]:
            problems.append(
                f"shape mismatch for {key}: {tuple(tensor.shape)} gives {tuple(value.shape)}, "
                f"{target} needs {target_shapes[target]}"
            )
            continue
        converted[target] = value.detach().to(torch.float32).contiguous()
    problems.extend(f"missing: no source key fills {k} {s}" for k, s in target_shapes.items() if k not in claimed)
    if problems:
        raise ConversionError(
            f"checkpoint does not match {cfg.arch} R{cfg.depth}{'-X' if cfg.groups > 1 else ''} "
            f"exactly ({len(problems)} problems, {len(converted)}/{len(target_shapes)} keys filled):\n  "
            + "\n  ".join(problems)
        )
    return converted
