#!/usr/bin/env python
"""Fine-tuning benchmark: `--init` against from scratch, and `--train-modules K:K` against all
modules; writes research/finetune/results/finetune.{json,md}. Parses argv and calls
`research.finetune.finetune.run_finetune_benchmark`; nothing else.
"""
from __future__ import annotations

import argparse
from pathlib import Path
import sys

from research.finetune.finetune import FinetuneGrid, run_finetune_benchmark, smoke_grid
from edgetrain.errors import UserError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="digits, 2 seeds, 1 epoch (seconds)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out-dir", default="research/finetune/results")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    grid = smoke_grid() if a.smoke else FinetuneGrid(seeds=tuple(range(a.seeds)))
    try:
        res = run_finetune_benchmark(grid, Path(a.out_dir), a.threads,
                                     log=lambda s: print(s, flush=True))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out_dir}/finetune.md ({res['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
