"""Cut a `Network` into K modules (`Stage`s), each with its auxiliary head.

Module 0 owns the stem. `split_depth` gives modules of (near) equal numbers of blocks;
`split_memory` balances the activation memory saved for backward, measured on one sample
batch (the paper's "equally heavy" modules). Stacking the stages' features reproduces the
whole network's forward exactly.
"""
from __future__ import annotations

import copy

import torch

from edgetrain.errors import UserError
from edgetrain.measure import saved_activation_bytes
from edgetrain.method.heads import make_head, resolve_heads
from edgetrain.method.stage import Stage, split_runs
from edgetrain.models.base import Network


def split_depth(n_blocks: int, k: int) -> list[int]:
    """Boundaries [0, b1, ..., n] of k runs of near-equal length (earlier runs get the extra)."""
    _check_k(n_blocks, k)
    return split_runs(n_blocks, k)


def _check_k(n_blocks: int, k: int) -> None:
    if k < 1 or k > n_blocks:
        raise UserError(f"--modules must be between 1 and the model's {n_blocks} blocks (got {k})")


def block_activation_bytes(net: Network, sample: torch.Tensor) -> list[int]:
    """Bytes saved for backward by each block (stem counted into block 0) on `sample`.

    Measured on a copy of `net`, so the network's BatchNorm statistics and mode are untouched.
    """
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
    """Wrap the blocks of `net` into stages (sharing the same parameters) with fresh heads;
    `head` is resolved per module (`resolve_heads`) and kept as `stage.head_kind`."""
    shapes = feature_shapes(net, bounds, sample)
    kinds = resolve_heads(head, shapes)
    stages = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        stages.append(Stage(list(net.blocks[a:b]), make_head(kinds[i], shapes[i], num_classes),
                            stem=net.stem if i == 0 else None))
        stages[-1].head_kind = kinds[i]
    return stages


