"""e2e, e2e+ckpt and edgetrain under RLIMIT_AS caps, and the smallest cap each completes at.
Thin wrapper over `edgetrain.bench.cap.bench_cap` (same as `edgetrain bench cap`).

    python benchmarks/cap.py --model resnet110 --input 3x96x96 --batch 64 --modules 16 \
        --recompute blocks          # [--ckpt-segments S (default: --modules; 0: skip)]
"""
from __future__ import annotations

import argparse
from pathlib import Path
import sys

from edgetrain.config import SPLITS  # no torch: --help stays fast


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet110")
    p.add_argument("--input", default="3x96x96", help="CxHxW")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--modules", type=int, default=16)
    p.add_argument("--mode", choices=["sequential", "multilap"], default="sequential")
    p.add_argument("--recompute", default="none", help="edgetrain's: none, blocks, segments:S")
    p.add_argument("--split", choices=SPLITS, default="depth")
    p.add_argument("--ckpt-segments", type=int, default=None,
                   help="S of e2e+ckpt (default: --modules; 0: skip)")
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
                        log=lambda line: print(line, flush=True), recompute=a.recompute,
                        split=a.split, ckpt_segments=a.ckpt_segments)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_cap(res))
    print(f"wrote {res['json_path']}\nwrote {res['md_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
