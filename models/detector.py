"""GN+WS Faster R-CNN and Mask R-CNN, reproducing mmdetection's inference.

Architecture (Qiao et al., arXiv:1903.10520; mmdetection ``configs/gn+ws``): GN+WS ResNet/ResNeXt
+ GN+WS FPN, RPN, Shared4Conv1FC box head with GN+WS convs, FCN mask head with GN+WS convs.
Modules come from torchvision (``ResNet``, ``BackboneWithFPN``, ``RPNHead``,
``FastRCNNConvFCHead``, ``MaskRCNNHeads`` and predictors); every part that differs from
mmdetection (docs/mmdetection-fidelity.md) is replaced: image transform (:mod:`models.preprocess`),
anchors (:mod:`models.anchors`), RoIAlign alignment and level mapping (:mod:`models.roi_extractor`),
two-sided delta clamp and no small-box filters (:mod:`models.box_ops`, :mod:`models.heads`),
class layout (:mod:`models.mmdet_convert`), mask pasting (:mod:`models.mask_paste`).

Remaining deliberate differences from mmdetection 3.3 inference, with their measured effect
(``tests/models/test_fidelity.py`` against ``tests/fixtures/reference``; docs/mmdetection-fidelity.md,
'Known differences from mmdetection' and 'How fidelity is tested'):

1. **Class layout.** The box classifier has background at index 0 (torchvision) instead of last;
   rows are permuted by the converter, so the softmax is identical. The regression and mask
   layers gain an unused all-zero background slot. Effect: none (same softmax terms).
2. **NMS kernel.** ``torchvision.ops.nms`` instead of mmcv's; both CPU kernels rank by score and
   suppress when ``inter / (a1 + a2 - inter) > thr`` with no +1, so on CPU the only possible
   effect is the order of exactly equal scores. mmcv's CUDA kernel tests
   ``inter > thr * (a1 + a2 - inter)`` without dividing, so on GPU a pair whose IoU is within
   float rounding of the threshold (0.7 RPN, 0.5 R-CNN) can be kept by one and suppressed by the
   other; not measured (no GPU fixture; the reference outputs are CPU runs).
3. **Batching.** mmdetection pads a batch to its largest image, which changes GroupNorm
   statistics (mmdetection issue #8157). :class:`models.predictor.Predictor` only puts images
   whose padded shapes are equal into one forward pass (on CUDA; on CPU it runs image by image,
   see ``Predictor.batched_forward``), so every image gets the padding it would get alone.
   Effect: list calls equal one-by-one calls bit for bit on CPU (tested); a multi-image forward
   pass differs from single passes by float rounding only (measured on CPU: 1e-6 in P5, boxes
   ≤ 6e-4 px), unlike mmdetection's padding-dependent batch results.
4. **Decoder.** Images are decoded with PIL (EXIF orientation applied with
   ``ImageOps.exif_transpose``) instead of ``cv2.imread``. Effect: none on the reference images
   (decoded pixels equal cv2's, max difference 0, and the ``input`` intermediate matches to
   ≤ 1e-6). A PIL built against another libjpeg than OpenCV's could decode some JPEG pixels
   one intensity level apart (≈ 0.017 after normalisation); not measured here.
5. **Float rounding.** Standardising weights once (:func:`models.bake.bake`) instead of in every
   forward, and oneDNN vs mmcv kernels, change values by float rounding only: measured box
   differences stay ≲ 0.02 px and score differences ≲ 2e-4, mmdetection's own run-to-run noise
   (docs/mmdetection-fidelity.md, 'How fidelity is tested').

The bf16/fp16 precision modes (:mod:`models.precision`; ``compute_dtype``/``channels_last`` below)
are outside this list: opt-in, not exact, and measured against fp32 in docs/benchmarks.md
('Precision modes'). In the default fp32 mode every cast they add returns its input unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .backbone import build_backbone
from .config import DetectorConfig
from .heads import RPN, ImageMeta, RoIHeads
from .ws_conv import has_ws


class GNWSDetector(nn.Module):
    """Two-stage GN+WS detector; ``forward`` takes a padded batch and returns detections.

    State-dict keys follow torchvision's Faster/Mask R-CNN (``backbone.body.*``, ``backbone.fpn.*``,
    ``rpn.head.*``, ``roi_heads.*``) with ``num_classes + 1`` outputs, background at 0.
    """

    def __init__(self, cfg: DetectorConfig, *, ws: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg, ws=ws)
        self.rpn = RPN(cfg)
        self.roi_heads = RoIHeads(cfg)
        if ws:
            self.roi_heads.use_ws()
        # Set by models.precision.apply_precision for the bf16/fp16 modes; fp32 contiguous is exact.
        self.compute_dtype: torch.dtype = torch.float32
        self.channels_last = False

    @property
    def is_baked(self) -> bool:
        """True when no WS conv is left (weights standardised once, plain convs)."""
        return not has_ws(self)

    def extract_features(self, images_nchw: torch.Tensor) -> dict[str, torch.Tensor]:
        """FPN features ``"0".."3"`` (P2-P5) and ``"pool"`` (P6) for a padded batch.

        The images are cast to :attr:`compute_dtype` (and channels-last) first in the bf16/fp16
        modes (:mod:`models.precision`); in fp32 the same tensor goes in.
        """
        if self.channels_last:
            images_nchw = images_nchw.to(self.compute_dtype, memory_format=torch.channels_last)
        else:
            images_nchw = images_nchw.to(self.compute_dtype)
        return self.backbone(images_nchw)

    def propose(
        self, features: dict[str, torch.Tensor], metas: Sequence[ImageMeta]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Test-time RPN proposals ``(boxes (K, 4), scores (K,))`` per image, resized pixels."""
        levels = list(features.values())
        anchors = self.rpn.anchors(levels)
        proposals = []
        # The RPN head runs image by image: oneDNN picks batch-size-dependent kernels for these
        # small plain convs (measured: 1e-6 differences that move proposals), and its cost is small.
        for i, meta in enumerate(metas):
            objectness, deltas = self.rpn([level[i : i + 1] for level in levels])
            proposals.extend(self.rpn.predict(objectness, deltas, anchors, [meta.img_shape]))
        return proposals

    @torch.inference_mode()
    def forward(self, images_nchw: torch.Tensor, metas: Sequence[ImageMeta]) -> list[dict[str, torch.Tensor]]:
        """Detect objects in a batch.

        Args:
            images_nchw: normalised fp32 images ``(N, 3, H, W)``, zero-padded bottom/right; all
                images must have the padding they would have alone (see difference 3 above).
                They are cast to :attr:`compute_dtype` (bf16/fp16 modes, :mod:`models.precision`).
            metas: per image ``ori_shape``, ``img_shape`` and ``scale_factor``.

        Returns:
            Per image a dict with ``boxes`` (K, 4) xyxy in original pixels, ``scores`` (K,),
            ``labels`` (K,) in ``0..C-1`` and, for Mask R-CNN, ``masks`` (K, H, W) bool.
        """
        if images_nchw.dim() != 4 or images_nchw.size(0) != len(metas):
            shape = tuple(images_nchw.shape)
            raise ValueError(f"expected (N, 3, H, W) images and N metas, got {shape} and {len(metas)}")
        features = self.extract_features(images_nchw)
        proposals = self.propose(features, metas)
        return [
            self.roi_heads.predict(features, boxes, i, meta)
            for i, ((boxes, _scores), meta) in enumerate(zip(proposals, metas, strict=True))
        ]


def build_detector(cfg: DetectorConfig, *, baked: bool = False) -> GNWSDetector:
    """The one constructor: a GN+WS detector for ``cfg``.

    Args:
        cfg: architecture and label space.
        baked: build plain convs (for weights already standardised by :func:`models.bake.bake`)
            instead of WS convs.
    """
    match cfg.arch:
        case "faster_rcnn" | "mask_rcnn":
            return GNWSDetector(cfg, ws=not baked)
        case _:  # pragma: no cover - DetectorConfig validates arch
            raise ValueError(f"unknown arch {cfg.arch!r}")
