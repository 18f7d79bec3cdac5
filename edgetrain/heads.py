"""Auxiliary classifiers F_k that turn a module's output into logits.

`dgl` (default) is the DGL/TRGL head: conv 3x3, ReLU, average pool to 2x2 (1x1 for odd
or tiny maps), BatchNorm, flatten, linear. `linear` is global average pool + linear and
`mlp` global average pool + a hidden layer. Token features (B, N, D) get a linear head on
the mean token whatever the kind.
"""
from __future__ import annotations

import torch
from torch import nn


class MeanToken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, D)
        return x.mean(dim=1)


def make_head(kind: str, feat_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build head `kind` for features of shape `feat_shape` (without the batch dim)."""
    if len(feat_shape) == 2:  # tokens
        return nn.Sequential(MeanToken(), nn.LayerNorm(feat_shape[1]),
                             nn.Linear(feat_shape[1], num_classes))
    if len(feat_shape) == 1:
        return nn.Linear(feat_shape[0], num_classes)
    c, h, w = feat_shape
    if kind == "dgl":
        p = 2 if h % 2 == 0 and w % 2 == 0 and h >= 2 and w >= 2 else 1
        return nn.Sequential(
            nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(inplace=True),
            nn.AvgPool2d((h // p, w // p)), nn.BatchNorm2d(c), nn.Flatten(),
            nn.Linear(c * p * p, num_classes))
    pool = [nn.AvgPool2d((h, w)), nn.Flatten()]  # fixed-size pool: exports cleanly to ONNX
    if kind == "linear":
        return nn.Sequential(*pool, nn.Linear(c, num_classes))
    if kind == "mlp":
        hidden = max(32, c)
        return nn.Sequential(*pool, nn.Linear(c, hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, num_classes))
    raise ValueError(f"unknown head {kind!r}")
