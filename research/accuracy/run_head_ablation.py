#!/usr/bin/env python
"""Probe behind issue 8's report: is the accuracy drop at modules 3-4 on Fashion-MNIST caused
by the DGL head on odd-sized maps? `edgetrain.method.heads.make_head("dgl", ...)` pools a 7x7 map
to 1x1 (a 2x2 pool needs an even size), so the heads after the midpoint downsampling see
C features where the heads before it see 4C. This script re-runs cells of the `cpu` grid
with the same configuration and seeds, but with a DGL head that pools odd maps to 2x2 with
overlapping windows (kernel ceil(H/2), stride floor(H/2)), and writes
research/accuracy/results/accuracy-cpu-head-ablation.json. It patches the head factory in this
process only; the library is unchanged.
"""
from __future__ import annotations

from pathlib import Path
import sys

from torch import nn

from research.accuracy.accuracy import cpu_grid, run_grid
from edgetrain.method import heads
import edgetrain.method.split as split

_orig = heads.make_head


def head_2x2(kind: str, feat_shape: tuple, num_classes: int) -> nn.Module:
    """The DGL head, pooling odd maps (H, W >= 3) to 2x2 as well."""
    if kind != "dgl" or len(feat_shape) != 3 or feat_shape[1] % 2 == 0 or feat_shape[1] < 3:
        return _orig(kind, feat_shape, num_classes)
    c, h, w = feat_shape
    return nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(inplace=True),
                         nn.AvgPool2d(((h + 1) // 2, (w + 1) // 2), (h // 2, w // 2)),
                         nn.BatchNorm2d(c), nn.Flatten(), nn.Linear(c * 4, num_classes))


def main(argv: list[str]) -> int:
    split.make_head = head_2x2
    grid = cpu_grid()
    grid.name = "cpu-head-ablation"
    grid.notes = ("cpu grid cells re-run with the DGL head pooling odd (7x7) maps to 2x2 "
                  "(research/accuracy/run_head_ablation.py); everything else as accuracy-cpu")
    grid.datasets = {"fashion-mnist": {int(n): grid.datasets["fashion-mnist"][int(n)]
                                       for n in (argv or ["600"])}}
    grid.arms = ["parallel-vangl", "parallel-trgl", "sequential-vangl", "sequential-trgl"]
    run_grid(grid, Path("research/accuracy/results/accuracy-cpu-head-ablation.json"),
             log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
