"""GN+WS ResNet / ResNeXt backbones with a GN+WS FPN, built from torchvision parts.

Follows mmdetection's ``ResNet``/``ResNeXt`` (``style='pytorch'``: stride on the 3x3 conv) and
``FPN`` (``add_extra_convs=False``, no activation, P6 = ``max_pool2d(P5, 1, stride=2)``) with
``conv_cfg=ConvWS`` and ``norm_cfg=GN(32)`` (docs/mmdetection-fidelity.md, 'Backbone: ResNet and
ResNeXt' and 'FPN'). GN is ``GroupNorm(32, C, eps=1e-5)`` after every conv (no conv bias there).
torchvision's ``ResNet``/``BackboneWithFPN``/``FeaturePyramidNetwork`` have the same structure;
only the norm layer (GroupNorm instead of FrozenBatchNorm) and the conv (WS) change.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .config import DetectorConfig
from .ws_conv import convert_convs_to_ws

FPN_CHANNELS = 256
_BLOCKS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


def group_norm(num_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """mmcv's ``GN`` norm layer: affine GroupNorm with eps 1e-5."""
    return nn.GroupNorm(num_groups, num_channels, eps=1e-5, affine=True)


class ContiguousGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that normalises a channels-last input with the contiguous (NCHW) kernel.

    For the RoI heads in the channels-last bf16 mode (:mod:`models.precision`): PyTorch's
    channels-last CPU GroupNorm kernel is slow for many small maps (1000 RoIs of 7x7, bf16:
    measured 76 ms against 9.5 ms contiguous plus 18 ms for the copy). Same parameters and
    state-dict keys as the ``nn.GroupNorm`` it replaces; the output is contiguous.
    """

    @classmethod
    def from_group_norm(cls, gn: nn.GroupNorm) -> ContiguousGroupNorm:
        """A ``ContiguousGroupNorm`` sharing ``gn``'s parameters."""
        out = cls(gn.num_groups, gn.num_channels, eps=gn.eps, affine=gn.affine, device="meta")
        out.weight, out.bias = gn.weight, gn.bias
        return out

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input.contiguous())


def build_backbone(cfg: DetectorConfig, *, ws: bool = True) -> BackboneWithFPN:
    """ResNet/ResNeXt body + FPN; ``ws=False`` builds plain convs (for baked weights).

    The returned module maps an image batch ``(N, 3, H, W)`` (H, W multiples of 32) to an
    ``OrderedDict`` with keys ``"0".."3"`` (P2-P5, strides 4-32) and ``"pool"`` (P6, stride 64),
    each ``(N, 256, ceil(H/s), ceil(W/s))``.
    """
    norm = partial(group_norm, num_groups=cfg.gn_groups)
    body = ResNet(
        Bottleneck,
        _BLOCKS[cfg.depth],
        groups=cfg.groups,
        width_per_group=cfg.width_per_group,
        norm_layer=norm,
    )
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[256, 512, 1024, 2048],
        out_channels=FPN_CHANNELS,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=norm,
    )
    if ws:
        convert_convs_to_ws(backbone)
    return backbone
