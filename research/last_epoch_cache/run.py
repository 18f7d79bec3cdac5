#!/usr/bin/env python
"""Next-module inputs from the last training epoch against the cache pass: sequential TRGL,
5 seeds, digits then Fashion-MNIST (5,000 training images), 2 epochs per module; writes
research/last_epoch_cache/results/last_epoch_cache.{json,md} after every run (`--fresh` to
start over).

It parses argv and calls `research.last_epoch_cache.last_epoch_cache.run_study`; nothing else.
"""
from __future__ import annotations

import argparse
from pathlib import Path
import sys

from edgetrain.errors import UserError
from research.last_epoch_cache.last_epoch_cache import DATASETS, run_study


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", choices=sorted(DATASETS), default=[],
                    help="only this data set (repeatable; default: all, in order)")
    ap.add_argument("--seeds", type=int, default=5, help="number of seeds (0, 1, ...)")
    ap.add_argument("--out-dir", default="research/last_epoch_cache/results")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    ap.add_argument("--fresh", action="store_true", help="ignore an interrupted run's results")
    a = ap.parse_args(argv)
    datasets = {d: DATASETS[d] for d in (a.data or DATASETS)}
    try:
        res = run_study(Path(a.out_dir), datasets, list(range(a.seeds)),
                        threads=a.threads or None, resume=not a.fresh,
                        log=lambda s: print(s, flush=True))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {res['json_path']}\nwrote {res['md_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
