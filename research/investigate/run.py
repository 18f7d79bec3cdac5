#!/usr/bin/env python
"""The investigation runs of `research.investigate.investigate` (10 and 40 modules, per-sample
transport scaling) and its figures, for a background run after the `paper-cpu` preset's
t13-digits part has been tuned:

    nohup nice -n 10 python -m research.investigate.run > investigate.log 2>&1 &

Rerunning resumes; `--figures-only` redraws the figures from the results on disk. It
parses argv and calls the library; nothing else.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from research.accuracy.accuracy import run_benchmark
from research.investigate.investigate import investigation_gridset, result_file, write_investigation
from research.paper_cpu.paper_cpu import tuned_overrides
from edgetrain.errors import UserError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="research/investigate/results")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--figures-only", action="store_true")
    ap.add_argument("--part", action="append", default=[],
                    help="only this run, e.g. k40 (repeatable; default: all, in order)")
    a = ap.parse_args(argv)
    out = Path(a.out_dir)
    try:
        if not a.figures_only:
            tuning = result_file(out, "accuracy-paper-cpu-tuning-t13-digits.json")
            tuned = tuned_overrides(json.loads(tuning.read_text())) if tuning.is_file() else None
            gs = investigation_gridset(tuned)
            gs.parts = [p for p in gs.parts
                        if not a.part or p.name.removeprefix("investigate-") in a.part]
            if not gs.parts:
                raise UserError(f"no investigation part among {a.part}")
            run_benchmark(gs, out, device="cpu", threads=a.threads,
                          log=lambda s: print(s, flush=True))
        for p in write_investigation(out):
            print(f"wrote {p}", flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
