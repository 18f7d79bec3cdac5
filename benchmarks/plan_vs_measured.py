"""Planner check: predicted peak memory against the peak measured in a fresh process.

Usage: python benchmarks/plan_vs_measured.py [--threads 2] [--out benchmarks/results]
       [--only N ...]   (indices into the default configuration list)

Writes benchmarks/results/plan_vs_measured.json and .md (see
edgetrain.bench.plan_vs_measured for what is measured).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from edgetrain.bench.plan_vs_measured import DEFAULT_CONFIGS, HEADER, bench_plan_vs_measured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--only", type=int, nargs="*", default=None)
    args = ap.parse_args()
    configs = [DEFAULT_CONFIGS[i] for i in args.only] if args.only else DEFAULT_CONFIGS
    print(HEADER, flush=True)
    res = bench_plan_vs_measured(configs, args.threads, args.out,
                                 log=lambda line: print(line, flush=True))
    print(f"tensors all within {res['tolerance']:.0%}: {res['all_within_tolerance']}; process: "
          f"{res['all_process_within_tolerance']}  "
          f"({res['json_path']}, {res['md_path']})")


if __name__ == "__main__":
    main()
