"""Peak memory of every regime against end-to-end (the paper's Table 5), one fresh process per
configuration. Thin wrapper over `edgetrain.bench.memory.bench_memory` (same as
`edgetrain bench memory`).

    python benchmarks/memory.py --model resnet110 --input 3x96x96 --batch 64 \
        --modules 4 8 16 --modes e2e parallel sequential multilap [--device cuda]
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
    p.add_argument("--modules", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--modes", nargs="+", default=["e2e", "parallel", "sequential", "multilap"],
                   choices=["e2e", "parallel", "sequential", "multilap"])
    p.add_argument("--no-vangl", action="store_true", help="TRGL only (skip the no-transport rows)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per module and lap")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    from edgetrain.bench.memory import bench_memory, format_table
    from edgetrain.cli import parse_shape
    from edgetrain.errors import UserError
    try:
        res = bench_memory(a.model, parse_shape(a.input), a.batch, a.modules, a.modes,
                           transports=(True,) if a.no_vangl else (True, False), device=a.device,
                           steps=a.steps, width=a.width, depth=a.depth, threads=a.threads,
                           out_dir=Path(a.out), log=lambda line: print(line, flush=True))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(res))
    print(f"wrote {res['json_path']} and {res['png_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
