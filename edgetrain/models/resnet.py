"""CIFAR-style ResNet-n (n = 6m + 2) and the wide "K-M ResNet" of the paper's Appendix G.

Blocks are pre-activation basic blocks written so that out = shortcut(x) + r(x) exactly:
r(x) is the residue the transport cost penalises. A block that changes shape uses a 1x1
projection shortcut and its residue is out - shortcut(x), the residual branch.
"""
from __future__ import annotations

import torch
from torch import nn

from edgetrain.errors import UserError
from edgetrain.models import register_model
from edgetrain.models.base import Network


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 branch plus identity or 1x1 projection shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.branch = nn.Sequential(
            nn.BatchNorm2d(c_in), nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
        )
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out
                         else nn.Conv2d(c_in, c_out, 1, stride, bias=False))
        # out - x == r exactly (up to rounding) iff the shortcut is the identity
        self.residue_is_delta = isinstance(self.shortcut, nn.Identity)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.branch(x)
        return self.shortcut(x) + r, r


def _stem(c_in: int, width: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(inplace=True))


def cifar_resnet(in_shape, num_classes: int, n: int, width: int | None = None) -> Network:
    """ResNet-n of He et al. for CIFAR: 3 stages of m = (n-2)/6 blocks, widths w, 2w, 4w."""
    if (n - 2) % 6 != 0 or n < 8:
        raise UserError(f"a CIFAR ResNet needs depth n = 6m + 2 >= 8 (got {n})")
    m, w = (n - 2) // 6, width or 16
    blocks, c = [], w
    for stage, c_out in enumerate((w, 2 * w, 4 * w)):
        for i in range(m):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(PreActBlock(c, c_out, stride))
            c = c_out
    return Network(_stem(in_shape[0], w, 1), blocks)


for _n in (8, 14, 20, 32, 44, 56, 110):
    register_model(f"resnet{_n}")(
        lambda in_shape, num_classes, width=None, depth=None, _n=_n:
        cifar_resnet(in_shape, num_classes, depth or _n, width))


@register_model("kmresnet")
def km_resnet(in_shape, num_classes: int, width: int | None = None,
              depth: int | None = None) -> Network:
    """The K-M ResNet of Appendix G: a downsampling encoder to `width` filters (the paper uses 256; the default 64 is CPU-sized), then
    `depth` (10) blocks with one more downsampling and doubling of filters at the midpoint.

    The encoder downsamples only inputs larger than 8x8 (an 8x8 digit keeps its resolution).
    """
    w, d = width or 64, depth or 10
    if d < 2:
        raise UserError("kmresnet needs --depth >= 2 (the midpoint block downsamples)")
    stem = _stem(in_shape[0], w, 2 if in_shape[1] > 8 else 1)
    blocks, c = [], w
    for i in range(d):
        mid = i == d // 2
        blocks.append(PreActBlock(c, 2 * c if mid else c, 2 if mid else 1))
        c = 2 * c if mid else c
    return Network(stem, blocks)
