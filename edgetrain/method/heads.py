"""Auxiliary classifiers F_k that turn a module's output into logits.

`dgl` is the DGL/TRGL head: conv 3x3, ReLU, average pool to 2x2 (overlapping windows for
odd sizes), BatchNorm, flatten, linear. `dgl-s2` is the same head with its conv at stride 2
on maps of at least `STRIDE_FROM` on each side: the pooled features average the same
filters' responses at a quarter of the positions, for a quarter of the head's compute. On
resnet20 (K=4, 3x32x32) the DGL heads cost 11-12% of a parallel training step; in the
head-cost study (research/head_cost/results/head_cost-dgl-s2.md, 5 seeds, sequential TRGL)
the strided head's best-depth test accuracy was -0.22 +- 0.38 points on digits and
+1.73 +- 1.76 on Fashion-MNIST against `dgl` (95% CIs, both spanning 0). `dgl-k1` is
`dgl-s2` with a 1x1 conv: per position a linear map of the channels, a ninth of the strided
conv's weights and compute. Against `dgl-s2` (research/head_cost/results/
head_cost-dgl-k1-vs-dgl-s2*.md, 5 seeds, sequential TRGL) its best-depth test accuracy was
+0.22 +- 0.45 points on digits and +0.50 +- 0.94 on Fashion-MNIST with resnet20, -0.11 +-
0.80 and +0.84 +- 1.92 with kmresnet (95% CIs, all spanning 0), with a seventh to a third
of the heads' parameters; resnet20's parallel and sequential train() took 0.97x as long
as with `dgl-s2` (benchmarks/results/speed.md, 9 paired rounds).
`dgl-light` first reduces the channels with a 1x1 conv (+ BatchNorm, ReLU) to
`light_width(c)` (a quarter, between 16 and 128), then is the DGL head on those: on
ResNet-50's 2048-channel maps the DGL head holds 2048 x 2048 x 9 conv weights (38 M), the
light one 0.4 M. `auto` (the default) picks `dgl-k1` for maps of at most `LIGHT_ABOVE`
channels (`dgl` in 0.2.0, then `dgl-s2`) and `dgl-light` above, per module; a run records
the resolved kinds, never `auto` (`resolve_heads`, `head_spec`). `linear` is global average
pool + linear and `mlp` global average pool + a hidden layer. Token features (B, N, D) get a
linear head on the mean token whatever the kind.
"""
from __future__ import annotations

import torch
from torch import nn

from edgetrain.errors import UserError


class MeanToken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, D)
        return x.mean(dim=1)


def _pool_to_2x2(h: int, w: int) -> nn.Module:
    """Average pool an h x w map to 2 x 2 (1 along a side of size 1) with a fixed kernel.

    Odd sizes use overlapping windows (kernel ceil(n/2), stride floor(n/2)): a 7x7 map keeps
    4 regions instead of collapsing to 1x1, which cost 3-14 points of accuracy on
    Fashion-MNIST in the accuracy benchmark's head ablation. Fixed kernels export to ONNX.
    """
    k = (max(1, -(-h // 2)) if h > 1 else 1, max(1, -(-w // 2)) if w > 1 else 1)
    s = (max(1, h // 2), max(1, w // 2))
    return nn.AvgPool2d(k, s)


STRIDE_FROM = 4  # `dgl-s2`, `dgl-k1`: maps at least this wide take the conv at stride 2
AUTO_HEAD = "dgl-k1"  # what `auto` builds on maps of at most LIGHT_ABOVE channels
LIGHT_ABOVE = 256  # channels above which `auto` picks the light head


def light_width(c: int) -> int:
    """The width `dgl-light` reduces c channels to: c/4, bounded to [16, 128]."""
    return max(16, min(128, c // 4))


def resolve_heads(spec: str, feat_shapes: list[tuple[int, ...]]) -> list[str]:
    """The head kind of each module: `spec` for all, a comma-separated kind per module, or
    `auto` (AUTO_HEAD up to LIGHT_ABOVE channels, dgl-light above)."""
    if spec == "auto":
        return ["dgl-light" if len(s) == 3 and s[0] > LIGHT_ABOVE else AUTO_HEAD
                for s in feat_shapes]
    kinds = spec.split(",")
    if len(kinds) == 1:
        return kinds * len(feat_shapes)
    if len(kinds) != len(feat_shapes):
        raise UserError(f"--head lists {len(kinds)} kinds for {len(feat_shapes)} modules")
    return kinds


def head_spec(kinds: list[str]) -> str:
    """The config.json value of resolved head kinds: one kind, or one per module."""
    return kinds[0] if len(set(kinds)) == 1 else ",".join(kinds)


def make_head(kind: str, feat_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build head `kind` (resolved: not `auto`) for features of shape `feat_shape` (without
    the batch dim)."""
    if len(feat_shape) == 2:  # tokens
        return nn.Sequential(MeanToken(), nn.LayerNorm(feat_shape[1]),
                             nn.Linear(feat_shape[1], num_classes))
    if len(feat_shape) == 1:
        return nn.Linear(feat_shape[0], num_classes)
    c, h, w = feat_shape
    if kind == "dgl-light":
        r = light_width(c)
        return nn.Sequential(nn.Conv2d(c, r, 1, bias=False), nn.BatchNorm2d(r), nn.ReLU(inplace=True),
                             make_head("dgl", (r, h, w), num_classes))
    if kind in ("dgl", "dgl-s2", "dgl-k1"):
        stride = 2 if kind != "dgl" and min(h, w) >= STRIDE_FROM else 1
        h2, w2 = -(-h // stride), -(-w // stride)  # the conv's output: padding 1, kernel 3
        kernel = 1 if kind == "dgl-k1" else 3
        return nn.Sequential(
            nn.Conv2d(c, c, kernel, stride, kernel // 2), nn.ReLU(inplace=True),
            _pool_to_2x2(h2, w2), nn.BatchNorm2d(c), nn.Flatten(),
            nn.Linear(c * min(h2, 2) * min(w2, 2), num_classes))
    pool = [nn.AvgPool2d((h, w)), nn.Flatten()]  # fixed-size pool: exports cleanly to ONNX
    if kind == "linear":
        return nn.Sequential(*pool, nn.Linear(c, num_classes))
    if kind == "mlp":
        hidden = max(32, c)
        return nn.Sequential(*pool, nn.Linear(c, hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, num_classes))
    raise ValueError(f"unknown head {kind!r}")
