#!/usr/bin/env python
"""Distributed scaling benchmark script: the same as `edgetrain bench distributed`.

Images/s of 1 process vs 2 processes (B = 0 and B > 0), one torch thread per process, gloo
over loopback. It parses argv, builds the launched processes' environment, and calls
`research.distributed.distributed.run_benchmark`; nothing else.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
import sys

from research.distributed.distributed import DEFAULT_TRAIN_ARGS, ScalingSetup, run_benchmark
from edgetrain.errors import UserError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nproc", type=int, action="append", default=[], help="process counts (2)")
    ap.add_argument("--buffer-size", type=int, action="append", default=[], help="B values (0, 4)")
    ap.add_argument("--out-dir", default="research/distributed/results")
    ap.add_argument("train_args", nargs=argparse.REMAINDER,
                    help="after --: `edgetrain train` options (default: a 4-module kmresnet "
                         "on 1024 synthetic 3x32x32 images)")
    a = ap.parse_args(argv)
    train_args = [t for t in a.train_args if t != "--"] or list(DEFAULT_TRAIN_ARGS)
    setup = ScalingSetup(train_args, a.nproc or [2], a.buffer_size or [0, 4], a.repeats)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    try:
        res = run_benchmark(setup, Path(a.out_dir), env, log=lambda s: print(s, flush=True))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in res["paths"]:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
