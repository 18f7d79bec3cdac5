"""A module of the network (`Stage`: optional stem, a run of blocks, head F_k) and `Prefix`.

`Stage` is the unit every regime trains: its forward paths compute the transport term of
TRGL (`edgetrain.method.transport`) without keeping residues alive. `Prefix` chains the
first k stages into one classifier (export, inference). How a network is cut into stages
is `edgetrain.method.split`.
"""
from __future__ import annotations

import torch
from torch import nn

from edgetrain.method.freeze import keep_frozen_in_eval
from edgetrain.method.transport import block_energy, transport_cost
from edgetrain.models.base import Network, run_blocks


class Stage(nn.Module):
    """Module k of the network: optional stem, a run of blocks, and head F_k.

    Forward paths (none keeps a list of residues alive):
      `features(x) -> z`: eval, cache writes, prefixes, export;
      `forward_transport(x, scaling) -> (z, w)`: TRGL training, w differentiable;
      `forward_statistic(x, scaling) -> (z, w)`: VanGL / e2e training, w detached;
      `forward(x) -> (logits, z)`.
    `forward_features(x) -> (z, residues)` keeps every residue: for tests and inspection only.
    """

    def __init__(self, blocks: list[nn.Module], head: nn.Module, stem: nn.Module | None = None):
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def train(self, mode: bool = True) -> "Stage":
        """Train mode for everything but the frozen parts (`edgetrain.method.freeze`)."""
        super().train(mode)
        keep_frozen_in_eval(self)
        return self

    @property
    def body_trainable(self) -> bool:
        """Whether any parameter outside the head trains (else transport is a constant)."""
        return any(p.requires_grad for n, p in self.named_parameters() if not n.startswith("head."))

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.stem is None else self.stem(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's output z; each residue is dropped as soon as its block returns."""
        x = self._stem(x)
        for blk in self.blocks:
            x, _ = blk(x)
        return x

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(z, residues), every residue kept: not for training or eval paths (see `features`)."""
        return run_blocks(self.blocks, self._stem(x))

    def forward_transport(self, x: torch.Tensor, scaling: str = "mean"
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features plus the differentiable transport cost W of the stage (TRGL).

        A block whose residue is its displacement (`residue_is_delta`) pays through
        `DeltaEnergy`, which saves nothing its neighbours do not already save; any other
        block's residue goes through `transport_cost` and is saved for backward.
        """
        x = self._stem(x)
        cost = torch.zeros((), device=x.device)
        for blk in self.blocks:
            out, r = blk(x)
            if r is not None:
                delta = bool(getattr(blk, "residue_is_delta", False))
                cost = cost + block_energy(x, out, r, delta, scaling)
            del r
            x = out
        return x, cost

    def forward_statistic(self, x: torch.Tensor, scaling: str = "mean"
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features plus the transport cost as a detached statistic (VanGL and e2e).

        Each residue is reduced to its scalar contribution under no_grad and dropped at
        once, so no residue outlives its block: keeping them would hold one extra feature
        map per block until the backward pass.
        """
        x = self._stem(x)
        cost = torch.zeros((), device=x.device)
        for blk in self.blocks:
            x, r = blk(x)
            if r is not None:
                with torch.no_grad():
                    cost += transport_cost([r], scaling)
            del r
        return x, cost

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits, features)."""
        z = self.features(x)
        return self.head(z), z


class Prefix(nn.Module):
    """G_k followed by F_k: a complete classifier from the first k stages (for eval/export)."""

    def __init__(self, stages: list[Stage], features_only: bool = False):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.features_only = features_only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for st in self.stages:
            x = st.features(x)
        return x if self.features_only else self.stages[-1].head(x)


def init_orthogonal(module: nn.Module, gain: float) -> None:
    """Orthogonal init (Saxe et al.) of every conv / linear weight, as in Appendix E."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.orthogonal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def whole_network(net: Network, head: nn.Module) -> Stage:
    """The whole network as one stage with `head` (the last module's): end-to-end training,
    and every depth of an e2e run."""
    return Stage(list(net.blocks), head, stem=net.stem)
