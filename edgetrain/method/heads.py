"""Auxiliary classifiers F_k that turn a module's output into logits.

`dgl` (default) is the DGL/TRGL head: conv 3x3, ReLU, average pool to 2x2 (overlapping
windows for odd sizes), BatchNorm, flatten, linear. `linear` is global average pool + linear and
`mlp` global average pool + a hidden layer. Token features (B, N, D) get a linear head on
the mean token whatever the kind.
"""
from __future__ import annotations

import torch
from torch import nn


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


def make_head(kind: str, feat_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build head `kind` for features of shape `feat_shape` (without the batch dim)."""
    if len(feat_shape) == 2:  # tokens
        return nn.Sequential(MeanToken(), nn.LayerNorm(feat_shape[1]),
                             nn.Linear(feat_shape[1], num_classes))
    if len(feat_shape) == 1:
        return nn.Linear(feat_shape[0], num_classes)
    c, h, w = feat_shape
    if kind == "dgl":
        return nn.Sequential(
            nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(inplace=True),
            _pool_to_2x2(h, w), nn.BatchNorm2d(c), nn.Flatten(),
            nn.Linear(c * min(h, 2) * min(w, 2), num_classes))
    pool = [nn.AvgPool2d((h, w)), nn.Flatten()]  # fixed-size pool: exports cleanly to ONNX
    if kind == "linear":
        return nn.Sequential(*pool, nn.Linear(c, num_classes))
    if kind == "mlp":
        hidden = max(32, c)
        return nn.Sequential(*pool, nn.Linear(c, hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, num_classes))
    raise ValueError(f"unknown head {kind!r}")
