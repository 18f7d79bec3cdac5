"""The uniform model surface: `Network` = stem + blocks, each block -> (out, residue).

A residue is r(x) in out = x + r(x) (or out = shortcut(x) + r(x) for a block that changes
shape with a projection), or None for a block that carries no transport cost.
A block whose residue is exactly out - x (its returned output minus its input, the same
elements in the same order) declares `residue_is_delta = True`; TRGL's transport term then
saves nothing extra for backward (`edgetrain.method.transport.DeltaEnergy`). Absent means False.
"""
from __future__ import annotations

import torch
from torch import nn


class Network(nn.Module):
    """A stem followed by blocks. `forward` returns (features, residues)."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module]):
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return run_blocks(self.blocks, self.stem(x))


def run_blocks(blocks, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Apply blocks in order; return the output and the residues that are not None."""
    residues = []
    for blk in blocks:
        x, r = blk(x)
        if r is not None:
            residues.append(r)
    return x, residues


class AsResidual(nn.Module):
    """Treat any layer T as a block: residue T(x) - x when shapes match, else None.

    `residue_is_delta` (read after a forward, as `Stage` does) is True for the residue
    T(x) - x; for a layer that returns its own (out, residue) it is the layer's own
    `residue_is_delta` (False when it declares none: its residue may be anything).
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self._own_residue = False  # set by forward: the layer returned (out, residue)

    @property
    def residue_is_delta(self) -> bool:
        if self._own_residue:
            return bool(getattr(self.layer, "residue_is_delta", False))
        return True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.layer(x)
        if isinstance(out, tuple):  # already follows the (out, residue) convention
            if not self._own_residue:  # set once (no module mutation under torch.export)
                self._own_residue = True
            return out
        return out, (out - x if out.shape == x.shape else None)
