#!/usr/bin/env python
"""The `paper-cpu` accuracy preset with its tuning, part by part, for a background run:
for each part (Table 13 / Table 12 analogue on digits, then on Fashion-MNIST), tune lr and
tau on validation (`research.paper_cpu.paper_cpu.tune_part`, resumable, written to
accuracy-paper-cpu-tuning-<part>.json), then run the part's grid with the chosen values
(resumable, accuracy-paper-cpu-<part>.json) and rewrite the combined pages
(accuracy-paper-cpu.{json,md,png}).

    nohup nice -n 10 python -m research.paper_cpu.run > paper-cpu.log 2>&1 &

Rerunning the same command resumes. It parses argv and calls the library; nothing else.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from research.paper_cpu import paper_cpu as pc
from research.accuracy.accuracy import run_benchmark
from research.paper_cpu.paper_cpu_report import paper_cpu_gridset, write_tuning_report
from edgetrain.errors import UserError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", action="append", default=[],
                    help="only this part, e.g. t13-digits (repeatable; default: all, in order)")
    ap.add_argument("--seeds", type=int, default=None, help="number of grid seeds (default 5)")
    ap.add_argument("--no-tune", action="store_true",
                    help="use the preset's TUNED values (parts in TUNED are never re-tuned)")
    ap.add_argument("--out-dir", default="research/paper_cpu/results")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    out = Path(a.out_dir)
    log = lambda s: print(s, flush=True)  # noqa: E731
    try:
        parts = [g for g in pc.paper_cpu_parts()
                 if not a.part or g.name.removeprefix("paper-cpu-") in a.part]
        if not parts:
            raise UserError(f"no part among {a.part}")
        tuned: dict = {}
        for g in parts:
            if not a.no_tune and g.name not in pc.TUNED:  # TUNED: the record of parts run
                size = min(g.datasets[pc.only_dataset(g)])
                t = pc.tune_part(g, size, out / f"accuracy-paper-cpu-tuning-{g.name.removeprefix('paper-cpu-')}.json",
                                 threads=a.threads, log=log)
                tuned.update(pc.tuned_overrides(t))
                write_tuning_report(out)
                log(f"tuned {g.name}: {json.dumps(t['best'])}")
            gs = paper_cpu_gridset(tuned)
            gs.parts = [p for p in gs.parts if p.name == g.name]
            if a.seeds:
                gs.parts = [pc.with_seeds(p, a.seeds) for p in gs.parts]
            res = run_benchmark(gs, out, device="cpu", threads=a.threads, log=log)
            for p in res["paths"]:
                log(f"wrote {p}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
