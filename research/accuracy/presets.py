"""The named accuracy presets (`edgetrain bench accuracy --preset NAME`): the grids of
`research.accuracy.accuracy` and the `paper-cpu` grid set of `research.paper_cpu.paper_cpu`, and
narrowing a preset to some data sets and seeds."""
from __future__ import annotations

import dataclasses
from typing import Callable

from research.accuracy.accuracy import AccuracyGrid, GridSet, cpu_grid, paper_grid, smoke_grid
from research.paper_cpu.paper_cpu_report import paper_cpu_gridset
from edgetrain.errors import UserError


def paper_cpu_preset() -> GridSet:
    """The `paper-cpu` preset (Tables 12/13 at CPU scale): see `research.paper_cpu.paper_cpu`
    (imported here, when asked for, because it builds on this file)."""
    return paper_cpu_gridset()


PRESETS: dict[str, Callable[[], AccuracyGrid | GridSet]] = {
    "smoke": smoke_grid, "cpu": cpu_grid, "paper": paper_grid, "paper-cpu": paper_cpu_preset}


def preset(name: str) -> AccuracyGrid | GridSet:
    """The named grid (smoke, cpu, paper) or grid set (paper-cpu).

    Raises:
        UserError: unknown preset name.
    """
    if name not in PRESETS:
        raise UserError(f"unknown accuracy preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]()


def narrow_grid(name: str, datasets: list[str] | None = None,
                n_seeds: int | None = None) -> AccuracyGrid | GridSet:
    """Preset `name`, restricted to `datasets` and to its first `n_seeds` seeds (or more).

    Raises:
        UserError: unknown preset, a data set the preset does not hold, fewer than 2 seeds.
    """
    grid = preset(name)
    if isinstance(grid, GridSet):
        return _narrow_set(grid, datasets, n_seeds)
    if datasets:
        bad = sorted(set(datasets) - set(grid.datasets))
        if bad:
            raise UserError(f"preset {name} has no data set {', '.join(bad)} "
                            f"(it has {', '.join(grid.datasets)})")
        grid.datasets = {d: s for d, s in grid.datasets.items() if d in datasets}
    if n_seeds is not None:
        if n_seeds < 2:
            raise UserError(f"--seeds must be >= 2 for a confidence interval (got {n_seeds})")
        grid.seeds = list(range(n_seeds))
    return grid


def _narrow_set(gs: GridSet, datasets: list[str] | None, n_seeds: int | None) -> GridSet:
    if datasets:
        bad = sorted(set(datasets) - set(gs.datasets))
        if bad:
            raise UserError(f"preset {gs.name} has no data set {', '.join(bad)} "
                            f"(it has {', '.join(gs.datasets)})")
    if n_seeds is not None and n_seeds < 2:
        raise UserError(f"--seeds must be >= 2 for a confidence interval (got {n_seeds})")
    parts = []
    for p in gs.parts:
        keep = {d: s for d, s in p.datasets.items() if not datasets or d in datasets}
        if keep:
            parts.append(dataclasses.replace(
                p, datasets=keep, seeds=list(range(n_seeds)) if n_seeds else p.seeds))
    return dataclasses.replace(gs, parts=parts)
