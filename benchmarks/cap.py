"""End-to-end vs edgetrain under one RLIMIT_AS cap, and the smallest cap edgetrain completes at.
Thin wrapper over `edgetrain.bench.cap.bench_cap` (same as `edgetrain bench cap`).

    python benchmarks/cap.py --model resnet110 --input 3x96x96 --batch 64 --modules 16
"""
from __future__ import annotations

import argparse
from pathlib import Path
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet110")
    p.add_argument("--input", default="3x96x96", help="CxHxW")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--modules", type=int, default=16)
    p.add_argument("--mode", choices=["sequential", "multilap"], default="sequential")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cap-mib", type=float, default=None)
    p.add_argument("--tol-mib", type=float, default=32)
    p.add_argument("--max-probes", type=int, default=16)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    from edgetrain.bench.cap import bench_cap, format_cap
    from edgetrain.cli import parse_shape
    from edgetrain.errors import UserError
    try:
        res = bench_cap(a.model, parse_shape(a.input), a.batch, a.modules, a.mode, a.width, a.depth,
                        a.steps, a.threads, a.cap_mib, a.tol_mib, a.max_probes, Path(a.out),
                        log=lambda line: print(line, flush=True))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_cap(res))
    print(f"wrote {res['json_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
