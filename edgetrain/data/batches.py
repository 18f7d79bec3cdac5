"""Batches: index order, live augmentation and the per-epoch RNG every batch source shares.

Pure functions of their arguments; the order and augmentation of an epoch depend only on
(seed, salt, epoch) through `epoch_generator`, which is what makes resumed runs bit-identical.
"""
from __future__ import annotations

from typing import Iterator

import torch


# --------------------------------------------------------------------------- batches
def batch_indices(n: int, batch_size: int, shuffle: bool, gen: torch.Generator | None
                  ) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def augment(xb: torch.Tensor, gen: torch.Generator, flip: bool) -> torch.Tensor:
    """Random translation by up to H/8 pixels (zero padding) and optional horizontal flip.

    Works on float batches (B, C, H, W) on any device; the randomness comes from `gen` (CPU)
    so it is reproducible and independent of the device.
    """
    b, _, h, w = xb.shape
    pad = max(1, h // 8)
    padded = torch.nn.functional.pad(xb, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    if flip:
        mask = (torch.rand(b, generator=gen) < 0.5).to(xb.device)
        out = torch.where(mask.view(-1, 1, 1, 1), out.flip(-1), out)
    return out


def epoch_generator(seed: int, salt: int, epoch: int) -> torch.Generator:
    """The RNG of one epoch of one stream: a pure function of (seed, salt, epoch)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + salt * 10_007 + epoch) % 2**62)
