"""`edgetrain train --fit` on three CPU profiles and two models: measured peak RSS against
the plan's prediction and the profile's budget, each run in a fresh process.

Usage: python benchmarks/fit_vs_measured.py [--out benchmarks/results]

Writes benchmarks/results/fit_vs_measured.json and .md (see
edgetrain.bench.fit_vs_measured for what is measured).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from edgetrain.bench.fit_vs_measured import HEADER, bench_fit_vs_measured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--keep", action="store_true",
                    help="keep the completed rows of the existing result; run only the missing ones")
    args = ap.parse_args()
    print(HEADER, flush=True)
    res = bench_fit_vs_measured(out_dir=args.out, log=lambda line: print(line, flush=True),
                                keep=args.keep)
    print(f"all within budget: {res['all_within_budget']}  ({res['json_path']}, {res['md_path']})")


if __name__ == "__main__":
    main()
