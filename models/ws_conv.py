"""Weight-standardised convolution, numerically identical to mmcv's ``ConvWS2d``.

Weight Standardization: Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and
Weight Standardization", arXiv:1903.10520. Reference implementation: mmcv
``mmcv/cnn/bricks/conv_ws.py`` (``conv_ws_2d``): per output channel,
``(W - mean) / (std + eps)`` with the *unbiased* std and ``eps = 1e-5`` added to the std.
timm's ``StdConv2d`` (biased variance, eps inside the sqrt) is a different function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

WS_EPS = 1e-5


def standardize_weight(weight: torch.Tensor, eps: float = WS_EPS) -> torch.Tensor:
    """Standardise a conv kernel per output channel exactly as mmcv's ``conv_ws_2d`` does.

    Args:
        weight: kernel of shape ``(C_out, C_in / groups, kh, kw)``.
        eps: added to the unbiased standard deviation.

    Returns:
        The standardised kernel, same shape and dtype.
    """
    c_out = weight.size(0)
    flat = weight.view(c_out, -1)
    mean = flat.mean(dim=1, keepdim=True).view(c_out, 1, 1, 1)
    std = flat.std(dim=1, keepdim=True).view(c_out, 1, 1, 1)
    return (weight - mean) / (std + eps)


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose kernel is standardised on every forward pass (mmcv ``ConvWS2d``).

    The state dict holds the raw (un-standardised) kernel, as in mmdetection checkpoints.
    Input ``(N, C_in, H, W)`` → output ``(N, C_out, H', W')``.
    """

    def __init__(self, *args: object, eps: float = WS_EPS, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = standardize_weight(self.weight, self.eps)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> WSConv2d:
        """A WS conv with the same geometry as ``conv``, sharing its parameters."""
        ws = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        ws.weight = conv.weight
        ws.bias = conv.bias
        return ws

    def to_plain_conv(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding the standardised kernel (inference only)."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,  # type: ignore[arg-type]
            stride=self.stride,  # type: ignore[arg-type]
            padding=self.padding,  # type: ignore[arg-type]
            dilation=self.dilation,  # type: ignore[arg-type]
            groups=self.groups,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(standardize_weight(self.weight.detach(), self.eps))
            if self.bias is not None and conv.bias is not None:
                conv.bias.copy_(self.bias.detach())
        return conv


def convert_convs_to_ws(module: nn.Module) -> nn.Module:
    """Replace every plain ``nn.Conv2d`` below ``module`` by a :class:`WSConv2d` (in place)."""
    for name, child in module.named_children():
        if type(child) is nn.Conv2d:
            setattr(module, name, WSConv2d.from_conv(child))
        else:
            convert_convs_to_ws(child)
    return module


def has_ws(module: nn.Module) -> bool:
    """True when any :class:`WSConv2d` remains below ``module``."""
    return any(isinstance(m, WSConv2d) for m in module.modules())
