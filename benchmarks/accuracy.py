#!/usr/bin/env python
"""Accuracy benchmark script: the same as `edgetrain bench accuracy`, for running in the
background with a log (`nohup python benchmarks/accuracy.py --preset cpu > log &`).

It parses argv and calls `edgetrain.bench.accuracy.run_benchmark`; nothing else.
"""
from __future__ import annotations

import argparse
from pathlib import Path
import sys

from edgetrain.bench.accuracy import run_benchmark
from edgetrain.bench.presets import PRESETS, narrow_grid
from edgetrain.errors import UserError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--data", action="append", default=[], help="only this data set (repeatable)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds")
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--fresh", action="store_true", help="ignore an interrupted run's results")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    try:
        grid = narrow_grid(a.preset, a.data, a.seeds)
        out = run_benchmark(grid, Path(a.out_dir), device=a.device, threads=a.threads or None,
                            resume=not a.fresh, plots=not a.no_plots,
                            log=lambda s: print(s, flush=True))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in out["paths"]:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
