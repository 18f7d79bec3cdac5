"""Speed benchmark of the activation cache (same as `edgetrain bench speed`).

usage: python benchmarks/speed.py [--out benchmarks/results] [--ks 4,8] [--epochs 3]
       [--synthetic-size 512] [--cache-dtype float16] [--no-accuracy] [--no-rss]
       [--parts regimes,profile,steps,heads,cache_vs_recompute,disk_vs_ram,rss,accuracy] [--rounds 3]

regimes: every regime's train() wall time over e2e's (total_over_e2e), median of --rounds
paired rounds, on resnet20 (1,024 samples, 2 epochs) and resnet56 (512 samples, 4 epochs),
K=4; profile: where each regime's CPU time goes (resnet20). Run it on a quiet machine.
"""
import argparse
from pathlib import Path

from edgetrain.bench.speed import PARTS, run_speed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--ks", default="4,8")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--synthetic-size", type=int, default=512)
    ap.add_argument("--cache-dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="comma-separated parts to run; the others keep their earlier figures")
    ap.add_argument("--rounds", type=int, default=3, help="paired rounds of the regime table")
    a = ap.parse_args()
    res = run_speed(Path(a.out), ks=[int(v) for v in a.ks.split(",")], epochs=a.epochs,
                    synthetic_size=a.synthetic_size, cache_dtype=a.cache_dtype,
                    accuracy=not a.no_accuracy, rss=not a.no_rss,
                    parts=tuple(a.parts.split(",")), rounds=a.rounds)
    print(res["table_md"])


if __name__ == "__main__":
    main()
