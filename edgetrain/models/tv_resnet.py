"""torchvision's ResNet-18/50/101/152 as edgetrain block lists (stem + blocks -> (out, residue)).

`adapt_resnet(model)` turns any torchvision `ResNet` (a user's own backbone included) into a
`Network`: the stem is conv1-bn1-relu(-maxpool), each BasicBlock/Bottleneck becomes one block,
and avgpool/fc are dropped (the auxiliary heads replace them). Weights are never downloaded.

Residue convention. torchvision blocks apply ReLU *after* the addition,
out = relu(shortcut(x) + branch(x)), so the branch is not the block's displacement. We keep
the block's forward bit-for-bit and define the residue as the displacement itself,
r(x) = out - shortcut(x) (shortcut = identity, or the 1x1 projection + BN of a block that
changes shape). Then out = shortcut(x) + r(x) holds exactly (up to float rounding of the
subtraction), r(x) = T(x) - x for identity blocks as in the paper's Section 2.1, and the
network computes exactly what torchvision computes, so torchvision weights still load. The
alternative (moving the ReLU into the next block) would change where the stream is observed
and make identity blocks non-residual with respect to their own input.

Stems: `imagenet` (conv 7x7/2 + max-pool: /4) or `cifar` (conv 3x3/1, no pool: the
32x32 CIFAR stem). The registry picks `imagenet` for inputs of 64 px or more on the shorter
side and `cifar` below, so 8x8 digits end at a 1x1 map and never below. Widths other than
torchvision's 64 build the same architecture from torchvision's block classes with base
planes `width` (2x, 4x, 8x in the later stages), for CPU-sized runs and tests.
This file is not a training recipe: no pretrained weights, no ImageNet-specific init tricks.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck

from edgetrain.errors import UserError
from edgetrain.models import register_model
from edgetrain.models.base import Network

ARCHS = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet50": ("bottleneck", [3, 4, 6, 3]),
         "resnet101": ("bottleneck", [3, 4, 23, 3]), "resnet152": ("bottleneck", [3, 8, 36, 3])}
STEMS = ("auto", "imagenet", "cifar")


def _branch(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The residual branch of a torchvision BasicBlock / Bottleneck (before the addition)."""
    b = block
    h = b.relu(b.bn1(b.conv1(x)))
    if isinstance(b, Bottleneck):
        h = b.relu(b.bn2(b.conv2(h)))
        return b.bn3(b.conv3(h))
    return b.bn2(b.conv2(h))


class TorchvisionBlock(nn.Module):
    """A torchvision residual block returning (out, out - shortcut(x)); same forward as torchvision."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.residue_is_delta = block.downsample is None  # r = out - x, not out - ds(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ds = self.block.downsample
        shortcut = x if ds is None else ds(x)
        out = F.relu(_branch(self.block, x) + shortcut)
        return out, out - shortcut


def _stem(model: nn.Module, in_channels: int, stem: str) -> nn.Module:
    """conv1-bn1-relu(-maxpool) of `model`, with conv1 rebuilt if the stem or channels differ."""
    conv = model.conv1
    if stem == "cifar":
        conv = nn.Conv2d(in_channels, conv.out_channels, 3, 1, 1, bias=False)
        return nn.Sequential(conv, model.bn1, model.relu)
    if conv.in_channels != in_channels:
        conv = nn.Conv2d(in_channels, conv.out_channels, 7, 2, 3, bias=False)
    return nn.Sequential(conv, model.bn1, model.relu, model.maxpool)


def adapt_resnet(model: nn.Module, in_channels: int = 3, stem: str = "imagenet") -> Network:
    """Turn a torchvision `ResNet` into a `Network` of `TorchvisionBlock`s (shares its modules).

    Args:
        model: a `torchvision.models.ResNet` (any depth, any width).
        in_channels: channels of the input images (conv1 is rebuilt if they differ from it).
        stem: `imagenet` (conv 7x7 stride 2 + max-pool) or `cifar` (conv 3x3 stride 1, no pool).

    Returns:
        Network whose forward equals torchvision's up to (and excluding) avgpool and fc.

    Raises:
        UserError: a stem name other than `imagenet` / `cifar`.
    """
    if stem not in ("imagenet", "cifar"):
        raise UserError(f"stem must be 'imagenet' or 'cifar' (got {stem!r})")
    blocks = [TorchvisionBlock(b) for layer in (model.layer1, model.layer2, model.layer3,
                                                model.layer4) for b in layer]
    return Network(_stem(model, in_channels, stem), blocks)


def _init_like_torchvision(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _layer(block_cls, c_in: int, planes: int, n: int, stride: int) -> nn.Sequential:
    """torchvision's `_make_layer` with explicit channel counts."""
    c_out = planes * block_cls.expansion
    down = None
    if stride != 1 or c_in != c_out:
        down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
    blocks = [block_cls(c_in, planes, stride, down)]
    blocks += [block_cls(c_out, planes) for _ in range(n - 1)]
    return nn.Sequential(*blocks)


class ScaledResNet(nn.Module):
    """torchvision's ResNet layout with base planes `width` instead of 64 (no avgpool/fc)."""

    def __init__(self, kind: str, layers: list[int], width: int):
        super().__init__()
        cls = Bottleneck if kind == "bottleneck" else BasicBlock
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c = width
        for i, n in enumerate(layers):
            planes = width * 2 ** i
            setattr(self, f"layer{i + 1}", _layer(cls, c, planes, n, 1 if i == 0 else 2))
            c = planes * cls.expansion
        _init_like_torchvision(self)


def torchvision_resnet(arch: str, in_shape: tuple[int, int, int], width: int | None = None,
                       stem: str = "auto") -> Network:
    """Build `arch` (resnet18/50/101/152) as a Network for inputs of shape (C, H, W).

    Args:
        arch: one of `ARCHS`.
        in_shape: (C, H, W) of the inputs.
        width: base planes (torchvision: 64, the default); other values scale every stage.
        stem: `auto` (imagenet for min(H, W) >= 64, else cifar), `imagenet` or `cifar`.

    Raises:
        UserError: unknown arch or stem.
    """
    if arch not in ARCHS:
        raise UserError(f"unknown torchvision ResNet {arch!r}; choose from {', '.join(ARCHS)}")
    if stem not in STEMS:
        raise UserError(f"stem must be one of {', '.join(STEMS)} (got {stem!r})")
    if stem == "auto":
        stem = "imagenet" if min(in_shape[1:]) >= 64 else "cifar"
    if width is None or width == 64:
        model = getattr(torchvision.models, arch)(weights=None)
    else:
        model = ScaledResNet(*ARCHS[arch], width)
    net = adapt_resnet(model, in_shape[0], stem)
    _init_like_torchvision(net.stem)
    return net


def _register(arch: str) -> None:
    @register_model(arch)
    def build(in_shape, num_classes, width=None, depth=None):
        if depth is not None:
            raise UserError(f"{arch} has a fixed depth; --depth applies to kmresnet, the CIFAR "
                            "resnets and vit")
        return torchvision_resnet(arch, in_shape, width)


for _arch in ARCHS:
    _register(_arch)
