"""VGG-11 / VGG-19 with BatchNorm, every conv layer a block.

A layer whose input and output shapes agree is treated as a residual block with residue
T(x) - x (the paper's Section 2.1); a layer that changes shape (channels or a pooling)
carries no transport cost (residue None). Pooling is skipped once the map is 1x1, so
8x8 inputs work.
"""
from __future__ import annotations

from torch import nn

from edgetrain.models import register_model
from edgetrain.models.base import AsResidual, Network

CFGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def vgg(in_shape, cfg: list, width: int | None = None) -> Network:
    scale = (width or 64) / 64
    c, size, layers = in_shape[0], in_shape[1], []
    for i, v in enumerate(cfg):
        if v == "M":
            continue
        c_out = max(1, int(v * scale))
        layer = [nn.Conv2d(c, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        if i + 1 < len(cfg) and cfg[i + 1] == "M" and size >= 2:
            layer.append(nn.MaxPool2d(2))
            size //= 2
        layers.append(AsResidual(nn.Sequential(*layer)))
        c = c_out
    return Network(nn.Identity(), layers)


for _name, _cfg in CFGS.items():
    register_model(_name)(lambda in_shape, num_classes, width=None, depth=None, _cfg=_cfg:
                          vgg(in_shape, _cfg, width))
