"""Cut a `Network` into K modules (`Stage`s), each with its auxiliary head.

Module 0 owns the stem. `split_depth` gives modules of (near) equal numbers of blocks;
`split_memory` balances the activation memory saved for backward, measured on one sample
batch (the paper's "equally heavy" modules). Stacking the stages' features reproduces the
whole network's forward exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from edgetrain.errors import UserError
from edgetrain.heads import make_head
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
        from edgetrain.transport import block_energy
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
        from edgetrain.transport import transport_cost
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


def split_depth(n_blocks: int, k: int) -> list[int]:
    """Boundaries [0, b1, ..., n] of k runs of near-equal length (earlier runs get the extra)."""
    _check_k(n_blocks, k)
    sizes = [n_blocks // k + (1 if i < n_blocks % k else 0) for i in range(k)]
    return [0] + [sum(sizes[: i + 1]) for i in range(k)]


def _check_k(n_blocks: int, k: int) -> None:
    if k < 1 or k > n_blocks:
        raise UserError(f"--modules must be between 1 and the model's {n_blocks} blocks (got {k})")


def block_activation_bytes(net: Network, sample: torch.Tensor) -> list[int]:
    """Bytes saved for backward by each block (stem counted into block 0) on `sample`.

    Measured on a copy of `net`, so the network's BatchNorm statistics and mode are untouched.
    """
    import copy
    from edgetrain.memory import saved_activation_bytes
    net = copy.deepcopy(net).train()
    x = sample
    costs = []
    stem_bytes, x = saved_activation_bytes(lambda t: net.stem(t), x)
    for blk in net.blocks:
        b, (x, _) = saved_activation_bytes(blk, x)
        x = x.detach()
        costs.append(b)
    costs[0] += stem_bytes
    return costs


def split_balanced(costs: list[int], k: int) -> list[int]:
    """Contiguous partition of `costs` into k runs minimising the heaviest run (exact DP)."""
    n = len(costs)
    _check_k(n, k)
    pre = [0]
    for c in costs:
        pre.append(pre[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0
    for j in range(1, k + 1):
        for i in range(j, n + 1):
            for m in range(j - 1, i):
                v = max(best[j - 1][m], pre[i] - pre[m])
                if v < best[j][i]:
                    best[j][i], cut[j][i] = v, m
    bounds, i = [n], n
    for j in range(k, 0, -1):
        i = cut[j][i]
        bounds.append(i)
    return bounds[::-1]


def split_memory(net: Network, k: int, sample: torch.Tensor) -> list[int]:
    return split_balanced(block_activation_bytes(net, sample), k)


def make_bounds(net: Network, k: int, how: str, sample: torch.Tensor) -> list[int]:
    if how == "depth":
        return split_depth(len(net.blocks), k)
    _check_k(len(net.blocks), k)
    return split_memory(net, k, sample)


@torch.no_grad()
def feature_shapes(net: Network, bounds: list[int], sample: torch.Tensor) -> list[tuple]:
    """Output shape (without batch) of every stage, from one eval-mode forward."""
    was = net.training
    net.eval()
    x = net.stem(sample)
    shapes = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        for blk in net.blocks[a:b]:
            x, _ = blk(x)
        shapes.append(tuple(x.shape[1:]))
    net.train(was)
    return shapes


def build_stages(net: Network, bounds: list[int], head: str, num_classes: int,
                 sample: torch.Tensor) -> list[Stage]:
    """Wrap the blocks of `net` into stages (sharing the same parameters) with fresh heads."""
    shapes = feature_shapes(net, bounds, sample)
    stages = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        stages.append(Stage(list(net.blocks[a:b]), make_head(head, shapes[i], num_classes),
                            stem=net.stem if i == 0 else None))
    return stages


def init_orthogonal(module: nn.Module, gain: float) -> None:
    """Orthogonal init (Saxe et al.) of every conv / linear weight, as in Appendix E."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.orthogonal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
