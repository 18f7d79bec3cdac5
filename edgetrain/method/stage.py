"""A module of the network (`Stage`: optional stem, a run of blocks, head F_k) and `Prefix`.

`Stage` is the unit every regime trains: its forward paths compute the transport term of
TRGL (`edgetrain.method.transport`) without keeping residues alive. `Prefix` chains the
first k stages into one classifier (export, inference). How a network is cut into stages
is `edgetrain.method.split`.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from edgetrain.method.freeze import keep_frozen_in_eval
from edgetrain.method.precision import checkpoint_contexts
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

    With `recompute_segments` = S > 0 (`set_recompute`), the two training paths run the
    stem and blocks as S segments under `torch.utils.checkpoint`: only each segment's input
    is kept for backward, and the segment (its transport term included) is recomputed
    during backward. BatchNorm running statistics are updated once, by the first forward.
    """

    def __init__(self, blocks: list[nn.Module], head: nn.Module, stem: nn.Module | None = None):
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.recompute_segments = 0

    def set_recompute(self, spec: str) -> "Stage":
        """`--recompute`: "none", "blocks" (one segment per block) or "segments:S"."""
        self.recompute_segments = recompute_segments(spec, len(self.blocks))
        return self

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
        if self.recompute_segments and torch.is_grad_enabled():
            return self._recomputed(x, scaling, _transport_run)
        return _transport_run(self._stem(x), self.blocks, scaling)

    def forward_statistic(self, x: torch.Tensor, scaling: str = "mean"
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features plus the transport cost as a detached statistic (VanGL and e2e).

        Each residue is reduced to its scalar contribution under no_grad and dropped at
        once, so no residue outlives its block: keeping them would hold one extra feature
        map per block until the backward pass.
        """
        if self.recompute_segments and torch.is_grad_enabled():
            return self._recomputed(x, scaling, _statistic_run)
        return _statistic_run(self._stem(x), self.blocks, scaling)

    def _recomputed(self, x: torch.Tensor, scaling: str, run) -> tuple[torch.Tensor, torch.Tensor]:
        """A training path over `recompute_segments` checkpointed segments of blocks (the
        stem goes with the first): each segment keeps only its input for backward."""
        cost = torch.zeros((), device=x.device)
        bounds = split_runs(len(self.blocks), self.recompute_segments)
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            stem = self.stem if i == 0 else None
            seg = _Segment(stem, list(self.blocks[a:b]), scaling, run)
            x, c = checkpoint(seg, x, use_reentrant=False, context_fn=checkpoint_contexts)
            cost = cost + c
        return x, cost

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits, features)."""
        z = self.features(x)
        return self.head(z), z


def _transport_run(x: torch.Tensor, blocks, scaling: str, value: bool = True,
                   recomputed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks in order with their differentiable transport cost (TRGL).

    `value=False` (the recomputation of a checkpointed segment, whose outputs
    torch.utils.checkpoint discards) builds only what backward saves: a `DeltaEnergy`
    block then skips the energy's reduction and its residue-sized temporary."""
    cost = torch.zeros((), device=x.device)
    for blk in blocks:
        out, r = blk(x)
        if r is not None:
            delta = bool(getattr(blk, "residue_is_delta", False))
            cost = cost + block_energy(x, out, r, delta, scaling, value=value,
                                       into_residue=recomputed)
        del r
        x = out
    return x, cost


def _statistic_run(x: torch.Tensor, blocks, scaling: str, value: bool = True,
                   recomputed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks in order with their transport cost as a detached statistic (VanGL, e2e);
    `value=False` (a recomputation) skips the statistic."""
    cost = torch.zeros((), device=x.device)
    for blk in blocks:
        x, r = blk(x)
        if r is not None and value:
            with torch.no_grad():
                cost += transport_cost([r], scaling)
        del r
    return x, cost


class _Segment:
    """One checkpointed segment: the stem (first segment only) and a run of blocks.

    `torch.utils.checkpoint` calls it twice: the forward, then the recomputation during
    backward. The second call puts BatchNorm's running statistics back as they were, so they
    are updated once, exactly as without recomputation (the outputs are the same: in
    training mode BatchNorm normalises by the batch's statistics either way), and skips the
    transport cost's value (checkpoint keeps only the tensors backward saves; the value was
    taken by the first call): at a module's training peak that is one residue-sized
    temporary less.
    """

    def __init__(self, stem: nn.Module | None, blocks: list[nn.Module], scaling: str, run):
        self.stem, self.blocks, self.scaling, self.run, self.calls = stem, blocks, scaling, run, 0

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        modules = ([self.stem] if self.stem is not None else []) + self.blocks
        with frozen_batchnorm_stats(modules) if self.calls > 1 else nullcontext():
            x = x if self.stem is None else self.stem(x)
            return self.run(x, self.blocks, self.scaling, value=self.calls == 1, recomputed=True)


@contextmanager
def frozen_batchnorm_stats(modules: list[nn.Module]):
    """BatchNorm running statistics and batch counters as they were before the block: a
    recomputation updates them again, so they are put back afterwards (also when
    `torch.utils.checkpoint` stops a recomputation early by raising)."""
    bufs = [b for mod in modules for m in mod.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]
    saved = [b.detach().clone() for b in bufs]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in zip(bufs, saved):
                b.copy_(v)


def split_runs(n: int, k: int) -> list[int]:
    """Boundaries [0, b1, ..., n] of k runs of near-equal length (earlier runs get the extra)."""
    base, extra = divmod(n, k)
    bounds = [0]
    for i in range(k):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return bounds


def recompute_segments(spec: str, n_blocks: int) -> int:
    """Segments a stage of `n_blocks` blocks is recomputed in: 0 for "none"."""
    if spec == "none" or n_blocks == 0:
        return 0
    if spec == "blocks":
        return n_blocks
    return min(int(spec.split(":", 1)[1]), n_blocks)


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
