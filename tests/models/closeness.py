"""Distance of a reduced-precision model from fp32 where it means something for any weights.

Final detections of the synthetic reference weights are chaotic under any rounding change (an
untrained network puts many near-equal scores at every threshold), so they say nothing about the
accuracy of a precision mode with real weights. What does: the relative error of the network's
outputs before any ranking or thresholding, with both models fed the same input and, for the
heads, the same RoIs (the fp32 model's proposals and detections):

- each FPN level P2-P6 (``"0".."3"``, ``"pool"``);
- the RPN objectness logits and box deltas of all levels (from each model's own features);
- the R-CNN class logits and box deltas on the fp32 proposals;
- the mask logits of the detected classes on the fp32 detections (Mask R-CNN).

The relative error of a tensor is ``‖x − x_fp32‖₂ / ‖x_fp32‖₂`` over all its elements, with
``x`` cast to fp32. Used by ``tests/models/test_precision.py`` and ``bench/bench_precision.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.detector import GNWSDetector
from models.preprocess import PreparedImage

FPN_LEVELS = ("0", "1", "2", "3", "pool")


@dataclass(frozen=True)
class Outputs:
    """One model's outputs on one image, all fp32 on CPU (``contiguous``: channels-last ones too)."""

    features: dict[str, torch.Tensor]
    objectness: torch.Tensor
    rpn_deltas: torch.Tensor
    proposals: torch.Tensor
    cls_logits: torch.Tensor
    box_deltas: torch.Tensor
    detections: torch.Tensor
    mask_logits: torch.Tensor | None


def outputs(
    model: GNWSDetector,
    prepared: PreparedImage,
    *,
    proposals: torch.Tensor | None = None,
    detections: torch.Tensor | None = None,
) -> Outputs:
    """Run ``model`` on one image; the heads see ``proposals`` / ``detections`` when given.

    Args:
        model: a detector in any precision mode.
        prepared: the image.
        proposals: RPN proposals ``(K, 4)`` (resized pixels) to run the box head on; default the
            model's own.
        detections: boxes ``(D, 4)`` in resized pixels (and labels in column 4) for the mask head;
            default the model's own detections.
    """
    meta = [prepared]
    device = next(model.parameters()).device
    with torch.inference_mode():
        features = model.extract_features(prepared.image_chw[None].to(device))
        levels = list(features.values())
        objectness, rpn_deltas = model.rpn(levels)
        own_proposals = model.propose(features, meta)[0][0]
        rois_xyxy = own_proposals if proposals is None else proposals.to(device)
        rois = torch.cat([rois_xyxy.new_zeros((len(rois_xyxy), 1)), rois_xyxy], dim=1)
        cls_logits, box_deltas = model.roi_heads.box_forward(features, rois)
        if detections is None:
            result = model.roi_heads.predict(features, own_proposals, 0, prepared)
            sx, sy = prepared.scale_factor  # detections are in original pixels, mask RoIs in resized ones
            boxes = result["boxes"] * result["boxes"].new_tensor([sx, sy, sx, sy])
            detections = torch.cat([boxes, result["labels"][:, None].to(boxes.dtype)], dim=1)
        detections = detections.to(device)
        mask_logits = None
        if model.cfg.has_mask and len(detections):
            mask_rois = torch.cat([detections.new_zeros((len(detections), 1)), detections[:, :4]], dim=1)
            logits = model.roi_heads.mask_forward(features, mask_rois)
            labels = detections[:, 4].long()
            mask_logits = logits[torch.arange(len(labels), device=device), labels + 1]

    def cpu(x: torch.Tensor) -> torch.Tensor:
        return x.float().cpu().contiguous()

    return Outputs(
        features={k: cpu(v) for k, v in features.items()},
        objectness=torch.cat([cpu(o).flatten() for o in objectness]),
        rpn_deltas=torch.cat([cpu(d).flatten() for d in rpn_deltas]),
        proposals=cpu(own_proposals),
        cls_logits=cpu(cls_logits),
        box_deltas=cpu(box_deltas[:, 4:]),  # slot 0 is the unused background
        detections=cpu(detections),
        mask_logits=None if mask_logits is None else cpu(mask_logits),
    )


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """``‖x − reference‖₂ / ‖reference‖₂`` in fp32 (0 when both are empty)."""
    ref = reference.float()
    norm = ref.norm().item()
    diff = (x.float() - ref).norm().item()
    return 0.0 if norm == 0 and diff == 0 else diff / norm


def closeness(
    model: GNWSDetector,
    reference: GNWSDetector,
    prepared: PreparedImage,
    *,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Relative errors of ``model`` against the fp32 ``reference`` on one image.

    Args:
        model: the model under test.
        reference: the fp32 model.
        prepared: the image.
        autocast_dtype: run ``model`` (only) under ``torch.autocast`` with this dtype: the naive
            mixed-precision baseline.

    Returns:
        Keys ``P2``..``P6`` (FPN levels), ``rpn_objectness``, ``rpn_deltas``, ``cls_logits``,
        ``box_deltas`` and, for Mask R-CNN, ``mask_logits``.
    """
    ref = outputs(reference, prepared)
    device = next(model.parameters()).device.type
    with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = outputs(model, prepared, proposals=ref.proposals, detections=ref.detections)
    errors = {f"P{i + 2}": relative_error(out.features[k], ref.features[k]) for i, k in enumerate(FPN_LEVELS)}
    errors["rpn_objectness"] = relative_error(out.objectness, ref.objectness)
    errors["rpn_deltas"] = relative_error(out.rpn_deltas, ref.rpn_deltas)
    errors["cls_logits"] = relative_error(out.cls_logits, ref.cls_logits)
    errors["box_deltas"] = relative_error(out.box_deltas, ref.box_deltas)
    if ref.mask_logits is not None and out.mask_logits is not None:
        errors["mask_logits"] = relative_error(out.mask_logits, ref.mask_logits)
    return errors
