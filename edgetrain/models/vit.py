"""A small vision transformer for module-wise training: patch-embedding stem + pre-norm blocks.

The stream between blocks is a token tensor (B, N, D). One block is
out = y + mlp(ln2(y)) with y = x + attn(ln1(x)); its residue is the displacement
out - x = attn(...) + mlp(...), both branches together (one transport term per block).
There is no class token: the auxiliary heads of `edgetrain.method.heads` put a LayerNorm and a
linear layer on the mean token, as DeiT-style mean pooling does.

Sizes: `width` is the embedding dimension D (default 96), `depth` the number of blocks
(default 8), heads of 32 dimensions (fewer for narrow models), MLP ratio 4. The patch size
is the largest common divisor p of H and W that keeps a grid of at least 7x7 tokens
(8x8 digits: p = 1; 28x28: p = 4; 32x32: p = 4; 64x64: p = 8).
This file is not ViT-B/16: no class token, no dropout, no pretrained weights.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from edgetrain.errors import UserError
from edgetrain.models import register_model
from edgetrain.models.base import Network


def num_heads(dim: int, head_dim: int = 32) -> int:
    """The largest head count <= dim // head_dim (at least 1) that divides `dim`."""
    h = max(1, dim // head_dim)
    while dim % h:
        h -= 1
    return h


def patch_size(h: int, w: int, min_grid: int = 7) -> int:
    """Largest p dividing h and w with a token grid of at least min_grid on the shorter side."""
    fits = [p for p in range(1, min(h, w) + 1)
            if h % p == 0 and w % p == 0 and min(h, w) // p >= min_grid]
    return max(fits) if fits else 1


class PatchEmbed(nn.Module):
    """Conv p x p / p, flatten to tokens, add a learned position embedding."""

    def __init__(self, in_channels: int, dim: int, p: int, n_tokens: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, p, p)
        self.pos = nn.Parameter(torch.zeros(1, n_tokens, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N, D)
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


class Attention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention` (exports to ONNX)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, d/heads)
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm block; returns (out, out - x) where out - x = attention + MLP branches."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.residue_is_delta = True  # x, out and r are all (B, N, D), r = out - x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x + self.attn(self.ln1(x))
        out = y + self.mlp(self.ln2(y))
        return out, out - x


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


def vit(in_shape: tuple[int, int, int], width: int | None = None,
        depth: int | None = None) -> Network:
    """A ViT with embedding dimension `width` (96) and `depth` (8) blocks for (C, H, W) inputs."""
    d, n = width or 96, depth or 8
    c, h, w = in_shape
    p = patch_size(h, w)
    stem = PatchEmbed(c, d, p, (h // p) * (w // p))
    blocks = [TransformerBlock(d, num_heads(d)) for _ in range(n)]
    net = Network(stem, blocks)
    _init_weights(net)
    return net


@register_model("vit")
def _vit(in_shape, num_classes, width=None, depth=None) -> Network:
    if width is not None and width < 1:
        raise UserError("--width must be >= 1")
    return vit(tuple(in_shape), width, depth)
