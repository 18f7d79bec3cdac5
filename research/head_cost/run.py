#!/usr/bin/env python
"""Accuracy cost of the light head: sequential TRGL with `--head dgl` vs `--head dgl-light`,
3 seeds, on digits then Fashion-MNIST (5,000 training images); writes
research/head_cost/results/head_cost.{json,md} after every run (`--fresh` to start over).

It parses argv and calls `research.head_cost.head_cost.run_head_cost`; nothing else.
"""
from __future__ import annotations

import argparse
from pathlib import Path
import sys

from research.head_cost.head_cost import BASE, DATASETS, run_head_cost
from edgetrain.errors import UserError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", choices=sorted(DATASETS), default=[],
                    help="only this data set (repeatable; default: all, in order)")
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    ap.add_argument("--out-dir", default="research/head_cost/results")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--candidate", default="dgl-light",
                    help="the head compared with dgl (results: head_cost.* for dgl-light, "
                         "head_cost-CANDIDATE.* for another)")
    ap.add_argument("--reference", default="dgl",
                    help="the head the candidate is compared with (another than dgl: results "
                         "head_cost-CANDIDATE-vs-REFERENCE.*)")
    ap.add_argument("--model", default=BASE["model"],
                    help="the network (another than kmresnet, at its default width and depth: "
                         "results ...-on-MODEL.*)")
    ap.add_argument("--fresh", action="store_true", help="ignore an interrupted run's results")
    a = ap.parse_args(argv)
    datasets = {d: DATASETS[d] for d in (a.data or DATASETS)}
    base = BASE if a.model == BASE["model"] else {**BASE, "model": a.model, "depth": None}
    try:
        res = run_head_cost(Path(a.out_dir), datasets, list(range(a.seeds)), base,
                            device=a.device,
                            threads=a.threads or None, resume=not a.fresh,
                            log=lambda s: print(s, flush=True), candidate=a.candidate,
                            reference=a.reference)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {res['json_path']}\nwrote {res['md_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
