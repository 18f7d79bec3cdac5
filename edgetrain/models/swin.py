"""torchvision's Swin-Tiny (`swin_t`) cut into 12 blocks for module-wise training.

torchvision's `SwinTransformer.features` is [patch embedding, 2 blocks, merge, 2 blocks,
merge, 6 blocks, merge, 2 blocks], every `SwinTransformerBlock` being
x + attn(norm1(x)) + mlp(norm2(.)) on a channels-last (B, H, W, C) map, so it cuts cleanly:
- the stem is the patch embedding (conv p x p / p, permute, LayerNorm);
- each Swin block is one edgetrain block with residue out - x (its displacement);
- a `PatchMerging` (which halves H, W and doubles C) is folded into the block after it as
  that block's projection shortcut: out = blk(merge(x)), residue out - merge(x), the same
  convention as a ResNet block with a projection shortcut;
- the final LayerNorm / pool / fc are dropped: the auxiliary heads replace them.
Between blocks the stream is a token tensor (B, H*W, C) so that `edgetrain.method.heads` gives
every module the transformer head (LayerNorm + linear on the mean token, the paper's
linear head for Swin); each block knows its (H, W), computed from the input size.

Sizes: `width` is the embedding dimension (swin_t: 96), heads of 32 dimensions, window 7,
stochastic depth 0.2 as in `swin_t`. The patch is 4 for inputs of 64 px or more (swin_t's),
2 from 16 px (CIFAR: 16x16 tokens) and 1 below (8x8 digits). At width 96 with patch 4 the
parameters are exactly torchvision's swin_t (tested). This file downloads no weights.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer

from edgetrain.errors import UserError
from edgetrain.models import register_model
from edgetrain.models.base import Network
from edgetrain.models.vit import num_heads

DEPTHS = (2, 2, 6, 2)


class TokenStem(nn.Module):
    """swin's patch embedding, flattened to tokens: (B, C, H, W) -> (B, H'*W', D)."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x).flatten(1, 2)


class SwinBlock(nn.Module):
    """One Swin block (optionally preceded by a patch merge); `hw` is the input token grid."""

    def __init__(self, block: nn.Module, hw: tuple[int, int], merge: nn.Module | None = None):
        super().__init__()
        self.block, self.merge, self.hw = block, merge, hw
        # Without a merge, r = out - x on the (B, h, w, C) map is the block's returned tokens
        # minus its input tokens (B, h*w, C): the same elements in the same order. A merge
        # changes the layout (r = out - merge(x)), so r is not the block's displacement.
        self.residue_is_delta = merge is None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.unflatten(1, self.hw)  # (B, h, w, C)
        if self.merge is not None:
            x = self.merge(x)  # (B, ceil(h/2), ceil(w/2), 2C)
        out = self.block(x)
        return out.flatten(1, 2), out - x


def swin_patch(h: int, w: int) -> int:
    side = min(h, w)
    return 4 if side >= 64 else 2 if side >= 16 else 1


def swin_tiny(in_shape: tuple[int, int, int], width: int | None = None) -> Network:
    """torchvision's swin_t layout with embedding dimension `width` (96) for (C, H, W) inputs."""
    c, h, w = in_shape
    d, p = width or 96, swin_patch(h, w)
    model = SwinTransformer(patch_size=[p, p], embed_dim=d, depths=list(DEPTHS),
                            num_heads=[num_heads(d * 2 ** i) for i in range(len(DEPTHS))],
                            window_size=[7, 7], stochastic_depth_prob=0.2)
    if c != 3:
        model.features[0][0] = nn.Conv2d(c, d, p, p)
    return adapt_swin(model, (h // p, w // p))


def adapt_swin(model: nn.Module, grid: tuple[int, int]) -> Network:
    """Cut a torchvision `SwinTransformer` into a Network (shares its modules).

    Args:
        model: a torchvision SwinTransformer (features = embed, stage, merge, stage, ...).
        grid: (H, W) of the patch embedding's output map.
    """
    feats = list(model.features)
    blocks, merge, hw = [], None, tuple(grid)
    for layer in feats[1:]:
        if not isinstance(layer, nn.Sequential):  # PatchMerging: fold into the next block
            merge = layer
            continue
        for blk in layer:
            blocks.append(SwinBlock(blk, hw, merge))  # hw: the grid of the block's input
            if merge is not None:
                hw, merge = ((hw[0] + 1) // 2, (hw[1] + 1) // 2), None
    return Network(TokenStem(feats[0]), blocks)


@register_model("swin_t")
def _swin_t(in_shape, num_classes, width=None, depth=None) -> Network:
    if depth is not None:
        raise UserError("swin_t has a fixed depth (2, 2, 6, 2 blocks); --depth applies to "
                        "kmresnet, the CIFAR resnets and vit")
    return swin_tiny(tuple(in_shape), width)
