#!/usr/bin/env python
"""Floor analysis (what the heaviest module holds at its step peak, tensor by tensor):
`python benchmarks/floor.py` writes benchmarks/results/floor_resnet110_3x96x96_b64_sequential-K16.*"""
from __future__ import annotations

import argparse
from pathlib import Path

from edgetrain.bench.floor import floor_report
from edgetrain.config import parse_shape

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet110")
    ap.add_argument("--input", default="3x96x96")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--mode", default="sequential")
    ap.add_argument("--modules", type=int, default=16)
    ap.add_argument("--recompute", nargs="+", default=["none", "blocks", "segments:2"])
    ap.add_argument("--split", default="depth", choices=["depth", "memory"])
    ap.add_argument("--out-dir", default="benchmarks/results")
    a = ap.parse_args()
    res = floor_report(a.model, parse_shape(a.input), a.batch, a.mode, a.modules, a.recompute,
                       Path(a.out_dir), split=a.split)
    print("\n".join(f"wrote {p}" for p in res["paths"]))
